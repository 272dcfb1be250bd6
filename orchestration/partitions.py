"""One dynamic partition per singer: adding a singer adds a partition, never new code."""
import dagster as dg

SINGERS = "singers"
singers_partitions = dg.DynamicPartitionsDefinition(name=SINGERS)
