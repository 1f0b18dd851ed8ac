"""Replay: mix a share of earlier tasks' training data into each stage (the paper's strongest combination is
HFT + replay)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Union

Examples = Union[Sequence[Any], "datasets.Dataset"]  # noqa: F821


class ReplayBuffer:
    """Keeps the training data of finished tasks and mixes a share of it into the next stage's data.

    Args:
        fraction: Share of every mixed stage's examples that come from earlier tasks, in ``[0, 1)``: a stage with
            ``n`` examples of its own gets ``round(n * fraction / (1 - fraction))`` replayed ones, so with a fixed
            step budget ``fraction`` of each batch is replay on average. They are drawn without replacement, spread
            evenly over the earlier tasks (a task with too few examples gives all it has, the others make up for it).
        seed: Seed of the draws. The draw for a stage depends on the seed and the number of tasks added so far
            only, so a resumed run mixes the same data.

    Works with lists (of anything) and with ``datasets.Dataset``; :meth:`mix` returns the type it was given.

    Example:
        ```py
        >>> replay = ReplayBuffer(fraction=0.2, seed=0)
        >>> for task, data in tasks:
        ...     with continual.stage(task) as model:
        ...         train(model, replay.mix(data))
        ...     replay.add(task, data)
        ```
    """

    def __init__(self, fraction: float, seed: int = 0) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ValueError(
                f"ReplayBuffer.fraction must be a share in [0, 1), got {fraction!r}; e.g. 0.2 makes a fifth of each "
                "stage's data come from earlier tasks."
            )
        self.fraction = float(fraction)
        self.seed = seed
        self._tasks: dict[str, Examples] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def add(self, task: str, examples: Examples) -> None:
        """Keep ``examples`` (the training data of a finished task) for later stages."""
        if task in self._tasks:
            raise ValueError(f"Task {task!r} is already in the replay buffer; give every task its own name.")
        if len(examples) == 0:
            raise ValueError(f"Task {task!r} has no examples to keep for replay.")
        self._tasks[task] = examples

    def replay_counts(self, num_current: int) -> dict[str, int]:
        """How many examples of each earlier task :meth:`mix` adds to a stage with ``num_current`` examples."""
        if not self._tasks or self.fraction == 0:
            return {}
        wanted = round(num_current * self.fraction / (1 - self.fraction))
        sizes = {t: len(d) for t, d in self._tasks.items()}
        wanted = min(wanted, sum(sizes.values()))
        counts = dict.fromkeys(sizes, 0)
        open_tasks = list(sizes)
        while wanted > 0 and open_tasks:  # even shares; tasks that run out pass their share on
            share, extra = divmod(wanted, len(open_tasks))
            for i, task in enumerate(list(open_tasks)):
                take = min(share + (i < extra), sizes[task] - counts[task])
                counts[task] += take
                wanted -= take
                if counts[task] == sizes[task]:
                    open_tasks.remove(task)
        return counts

    def mix(self, examples: Examples) -> Examples:
        """``examples`` plus replayed examples of earlier tasks, shuffled together."""
        counts = self.replay_counts(len(examples))
        if not counts:
            return examples
        rng = random.Random(f"{self.seed}:{len(self._tasks)}")
        picks = {t: sorted(rng.sample(range(len(self._tasks[t])), n)) for t, n in counts.items() if n}
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets is optional
            datasets = None
        if datasets is not None and isinstance(examples, datasets.Dataset):
            parts = [examples] + [self._tasks[t].select(idx) for t, idx in picks.items()]
            return datasets.concatenate_datasets(parts).shuffle(seed=rng.randrange(2**32))
        mixed = list(examples) + [self._tasks[t][i] for t, idx in picks.items() for i in idx]
        rng.shuffle(mixed)
        return mixed
