"""In-process chains for parity checks and benchmarks (test scaffolding).

``LocalChain`` runs StageRuntimes one after another in one process; its baseline, one
llama.cpp context over the unsliced GGUF, is ``mesh.stage.reference.SingleContext``.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import numpy as np

from mesh.launcher import split_bounds  # noqa: F401  (the tests' name for cut ranges)
from mesh.model.slicing import slice_model
from mesh.stage.runtime import RuntimeConfig, StageRuntime, StepResult
from mesh.stage.sampling import SamplingParams


class LocalChain:
    def __init__(self, source: Path, ranges: list[tuple[int, int]], config: RuntimeConfig):
        self.stages: list[StageRuntime] = []
        try:
            for start, end in ranges:
                self.stages.append(StageRuntime(slice_model(source, start, end), config))
        except Exception:
            self.close()
            raise

    def run(
        self, session: Hashable, pos: int, tokens: np.ndarray, *,
        sample: SamplingParams | None = None, want_logits: bool = False,
    ) -> StepResult:
        x: np.ndarray | None = None
        result = StepResult()
        for stage in self.stages:
            stage.open_session(session)
            kwargs = {"tokens": tokens} if stage.is_first else {"hidden": x}
            if stage.is_last:
                result = stage.run(session, pos, sample=sample, want_logits=want_logits, **kwargs)
            else:
                x = stage.run(session, pos, **kwargs).hidden
        return result

    def drop(self, session: Hashable) -> None:
        for stage in self.stages:
            stage.drop_session(session)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
        self.stages = []
