import os

from hypothesis import HealthCheck, settings

# Stores opened by tests use 4 MiB segments unless a test asks for another size:
# every segment is preallocated, and the 64 MiB default made one run of the suite
# leave about 20 GB in the temporary directory. Servers started by tests inherit it.
os.environ.setdefault("STEMEDB_SEGMENT_SIZE", str(4 << 20))

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
