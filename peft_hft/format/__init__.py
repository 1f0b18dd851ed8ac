"""The adapter on disk: key and file names, safetensors checkpoints read and written tensor by tensor, fingerprints."""
