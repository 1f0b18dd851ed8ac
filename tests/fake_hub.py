"""An in-memory Hugging Face Hub behind huggingface_hub's real HTTP client, for offline tests.

``huggingface_hub`` sends every request through one ``httpx2.Client`` made by a replaceable factory
(``huggingface_hub.set_client_factory``). The tests install a client whose transport is :class:`FakeHub`, so
``create_repo``, ``create_commit`` (preupload, LFS batch and upload, the ndjson commit), ``hf_hub_download`` and
``snapshot_download`` run their real code down to the request layer, and the Hub's answers come from here. Every
commit is recorded with its operations and the bytes of every file (:attr:`FakeHub.commits`).

Xet uploads go through the native ``hf_xet`` library, not through the HTTP client, so the tests turn Xet off and
large files take the LFS "basic" transfer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from urllib.parse import unquote

try:  # huggingface_hub >= 2 uses httpx2, 1.x uses httpx; both have the same MockTransport API
    import httpx2
except ImportError:  # pragma: no cover
    import httpx as httpx2

ENDPOINT = "https://huggingface.co"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    repo_id: str
    sha: str
    summary: str
    operations: list[dict]  # {"key": "file"/"lfsFile"/"deletedFile", "path": ..., "bytes": ...}
    files: dict[str, bytes]


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files


class FakeHub:
    """Answers the Hub API calls huggingface_hub makes for uploads and downloads of model repos."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self._counter = 0

    # -- helpers ------------------------------------------------------------------------------------------------
    def _new_sha(self, seed: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{seed}:{self._counter}".encode()).hexdigest()

    def _commit(self, repo_id: str, branch: str, summary: str, operations: list[dict]) -> str:
        repo = self.repos[repo_id]
        files = dict(repo.snapshots[repo.branches[branch]]) if branch in repo.branches else {}
        for op in operations:
            if op["key"] in ("file", "lfsFile"):
                files[op["path"]] = op["bytes"]
            elif op["key"] == "deletedFile":
                files.pop(op["path"], None)
        sha = self._new_sha(repo_id)
        repo.snapshots[sha] = files
        repo.branches[branch] = sha
        self.commits.append(Commit(repo_id, sha, summary, operations, files))
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.snapshots[repo.branches.get(revision, revision)]

    def last_commit(self, repo_id: str) -> Commit:
        return [c for c in self.commits if c.repo_id == repo_id][-1]

    @staticmethod
    def _error(status: int, code: str, message: str) -> httpx2.Response:
        return httpx2.Response(status, headers={"X-Error-Code": code, "X-Error-Message": message},
                               json={"error": message})

    def _resolve(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        sha = repo.branches.get(revision, revision)
        return (sha, repo.snapshots[sha]) if sha in repo.snapshots else None

    # -- the transport --------------------------------------------------------------------------------------------
    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = unquote(request.url.path)
        self.requests.append((request.method, path))
        method = request.method

        if method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            if repo_id in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo",
                                                  "url": f"{ENDPOINT}/{repo_id}"})
            self.repos[repo_id] = Repo()
            attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            operation = {"key": "file", "path": ".gitattributes", "bytes": attributes}
            self._commit(repo_id, "main", "initial commit", [operation])
            return httpx2.Response(200, json={"url": f"{ENDPOINT}/{repo_id}", "name": repo_id})

        if method == "POST" and path == "/api/validate-yaml":
            return httpx2.Response(200, json={})

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
        if method == "POST" and m:
            repo_id, revision = m.groups()
            existing = self._resolve(repo_id, revision)
            current = existing[1] if existing else {}
            files = []
            for f in json.loads(request.content)["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES)
                old = current.get(f["path"])
                oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old))
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            return httpx2.Response(200, json={"files": files, "commitOid": existing[0] if existing else None})

        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and m:
            objects = []
            for obj in json.loads(request.content)["objects"]:
                action = None if obj["oid"] in self.lfs else {
                    "upload": {"href": f"{ENDPOINT}/lfs-upload/{obj['oid']}"}
                }
                objects.append({"oid": obj["oid"], "size": obj["size"], "authenticated": True,
                                **({"actions": action} if action else {})})
            return httpx2.Response(200, json={"transfer": "basic", "objects": objects})

        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if method == "PUT" and m:
            data = request.read()
            if hashlib.sha256(data).hexdigest() != m.group(1):
                return httpx2.Response(400, json={"error": "sha256 mismatch"})
            self.lfs[m.group(1)] = data
            return httpx2.Response(200)

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
        if method == "POST" and m:
            repo_id, revision = m.groups()
            if repo_id not in self.repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            lines = [json.loads(line) for line in request.read().decode().splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            operations = []
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    operations.append({"key": "file", "path": value["path"],
                                       "bytes": base64.b64decode(value["content"])})
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.lfs:
                        return httpx2.Response(422, json={"error": f"LFS object {value['oid']} was never uploaded"})
                    operations.append({"key": "lfsFile", "path": value["path"], "bytes": self.lfs[value["oid"]]})
                elif line["key"] in ("deletedFile", "deletedFolder"):
                    operations.append({"key": "deletedFile", "path": value["path"], "bytes": b""})
            sha = self._commit(repo_id, revision, header["summary"], operations)
            return httpx2.Response(200, json={"commitUrl": f"{ENDPOINT}/{repo_id}/commit/{sha}", "commitOid": sha,
                                              "pullRequestUrl": None})

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
        if method == "POST" and m:
            repo_id, branch = m.groups()
            repo = self.repos[repo_id]
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            return httpx2.Response(200, json={})

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if method == "GET" and m:
            resolved = self._resolve(m.group(1), m.group(2) or "main")
            if resolved is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            sha, files = resolved
            siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())]
            return httpx2.Response(200, json={"id": m.group(1), "modelId": m.group(1), "sha": sha,
                                              "siblings": siblings, "private": False})

        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if method in ("HEAD", "GET") and m:
            repo_id, revision, filename = m.groups()
            resolved = self._resolve(repo_id, revision)
            if resolved is None:
                return self._error(404, "RepoNotFound" if repo_id not in self.repos else "RevisionNotFound",
                                   "Repository or revision not found")
            sha, files = resolved
            if filename not in files:
                return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}")
            data = files[filename]
            headers = {"X-Repo-Commit": sha, "Content-Length": str(len(data)), "ETag": f'"{git_blob_sha1(data)}"'}
            if filename.endswith(LFS_SUFFIXES):  # LFS files: the linked etag is the content's sha256
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                headers["X-Linked-Size"] = str(len(data))
            return httpx2.Response(200, headers=headers, content=b"" if method == "HEAD" else data)

        return httpx2.Response(501, json={"error": f"FakeHub does not implement {method} {path}"})

    def client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self))
