"""One dynamic partition per singer: adding a singer adds a partition, never new code."""
import hashlib
from typing import Iterable

import dagster as dg

SINGERS = "singers"
singers_partitions = dg.DynamicPartitionsDefinition(name=SINGERS)


def roster_version(singers: Iterable[str]) -> str:
    """The data version of the set of registered singers (what the cross-singer training set depends on)."""
    return hashlib.md5("\n".join(sorted(singers)).encode()).hexdigest()[:16]
