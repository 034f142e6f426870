"""The data layer: tar shards, the plan of which image goes where, real image folders, K-shot sets, the kept set, fixtures."""
