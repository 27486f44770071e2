"""The Redis every service's data lives in by default, and the key namespace under it.

Features (`<root>:u:<id>`, `<root>:i:<id>`, ...) and ranking (`<root>:seen:<id>`) keep their
keys under one root so `infermesh seed` writes, and a deployment scopes (ACLs, key
prefixes), one namespace; each service owns the layout of its own keys beneath it.
"""

DEFAULT_NAMESPACE = "infermesh:v1"

# The port of the redis-server `infermesh up` starts, and so where every service and tool
# looks when not told otherwise (FEATURES_REDIS_URL, RANKING_REDIS_URL, JOBS_REDIS_URL,
# INFERMESH_REDIS_URL / REDIS_URL, --redis-url). Not Redis's own 6379: a system redis-server
# (Debian's package starts one) often holds that, and the demo must neither fail on a busy
# port nor load its catalog into someone else's Redis.
LOCAL_REDIS_PORT = 6390
DEFAULT_REDIS_URL = f"redis://127.0.0.1:{LOCAL_REDIS_PORT}/0"
