"""Key statistics: the second moment of a layer's keys over clean images (docs/method.md section 2).

:func:`collect_key_stats` runs the forward passes (stopped at the key site), caches the result and
splits the work under ``torch.distributed``; :class:`KeyStats` holds it and reads and writes its file.
"""

from surgery.stats.collect import accumulate_key_sums, collect_key_stats
from surgery.stats.fingerprint import weights_fingerprint
from surgery.stats.keystats import KeyStats

__all__ = ["KeyStats", "collect_key_stats", "accumulate_key_sums", "weights_fingerprint"]
