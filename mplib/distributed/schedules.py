"""mplib's schedule names mapped onto torch.distributed.pipelining's classes (the loss is weighed in `weighting`).

| mplib name | torch class | stages per rank | placement |
| --- | --- | --- | --- |
| gpipe | ScheduleGPipe | 1 | loop |
| 1f1b | Schedule1F1B | 1 | loop |
| interleaved | ScheduleInterleaved1F1B | v >= 2 | loop (stage s on rank s % K) |
| looped_bfs | ScheduleLoopedBFS | v >= 1 | loop |
| zero_bubble | ScheduleInterleavedZeroBubble (ZB1P) | v >= 1 | loop |
| zbv | ScheduleZBVZeroBubble | 2 | v (rank r: stages r and 2K-1-r) |
| dualpipev | ScheduleDualPipeV | 2 | v |

The first three are also mplib's own (`mplib.schedule.build`), so they can be simulated and run
in one process by `mplib.Pipeline`; the others exist only in torch. The zero-bubble ones split
each backward into the input's gradient (sent on at once) and the weights' (run later to fill the
bubble).
"""

from __future__ import annotations

from typing import Any

from torch.distributed import pipelining as pp

SCHEDULES: dict[str, tuple[Any, str, int | None]] = {  # name: (class, placement, stages per rank or None: any)
    "gpipe": (pp.ScheduleGPipe, "loop", 1),
    "1f1b": (pp.Schedule1F1B, "loop", 1),
    "interleaved": (pp.ScheduleInterleaved1F1B, "loop", None),
    "looped_bfs": (pp.ScheduleLoopedBFS, "loop", None),
    "zero_bubble": (pp.ScheduleInterleavedZeroBubble, "loop", None),
    "zbv": (pp.ScheduleZBVZeroBubble, "v", 2),
    "dualpipev": (pp.ScheduleDualPipeV, "v", 2),
}
SIMULATED = ("gpipe", "1f1b", "interleaved")  # the ones mplib.schedule.build knows


def check(name: str, num_stages: int, ranks: int, chunks: int) -> tuple[Any, str, int]:
    """(torch class, placement, stages per rank) for a schedule, with mplib's rules checked first.

    Example:
        cls, style, per_rank = check("interleaved", 4, 2, 4)
        cls.__name__, style, per_rank   # ('ScheduleInterleaved1F1B', 'loop', 2)
    """
    key = str(name).lower()
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; the known schedules are {', '.join(SCHEDULES)}")
    cls, style, per_rank = SCHEDULES[key]
    if num_stages % ranks:
        raise ValueError(f"{num_stages} stages cannot be dealt to {ranks} pipeline ranks alike; use a balance with "
                         f"a multiple of {ranks} stages")
    v = num_stages // ranks
    if per_rank is not None and v != per_rank:
        raise ValueError(f"schedule {key!r} runs {per_rank} stage(s) per rank, but {num_stages} stages over {ranks} "
                         f"ranks give {v}; use a balance of {per_rank * ranks} stages"
                         + ("" if per_rank != 1 else ", or schedule 'interleaved' for several per rank"))
    if key == "interleaved" and v < 2:
        raise ValueError(f"interleaved needs at least 2 stages per rank, got {v}; with one use '1f1b'")
    if key in ("1f1b", "interleaved", "zero_bubble", "zbv", "dualpipev") and chunks < ranks:
        raise ValueError(f"schedule {key!r} needs at least as many micro-batches as pipeline ranks, got chunks={chunks} "
                         f"< {ranks}; use chunks >= {ranks}, or 'gpipe'")
    if key == "interleaved" and chunks % ranks:
        raise ValueError(f"interleaved sends micro-batches in groups of K={ranks}, so chunks must be a multiple of "
                         f"{ranks}, got {chunks}; use chunks={max(ranks, chunks - chunks % ranks)} or "
                         f"{chunks + ranks - chunks % ranks}")
    return cls, style, v

