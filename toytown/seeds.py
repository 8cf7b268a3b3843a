"""Per-scene random streams. Scene i of a run depends only on (stream, seed, i), never on n."""
from __future__ import annotations

import numpy as np

STREAM_TREE = 0       # make_tree scenes
STREAM_TRIPLES = 1    # evaluation triples: disjoint from every tree scene, whatever the seeds


def scene_streams(stream: int, seed: int, index: int, parts: int) -> list[np.random.SeedSequence]:
    if seed < 0 or index < 0:
        raise ValueError(f"toy-town seeds and indices must be >= 0, got seed={seed} index={index}")
    return np.random.SeedSequence([int(stream), int(seed), int(index)]).spawn(parts)


def as_int(seq: np.random.SeedSequence) -> int:
    """A 31-bit integer seed (for render(..., seed)) drawn from a stream."""
    return int(seq.generate_state(1)[0] & 0x7FFFFFFF)
