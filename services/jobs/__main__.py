from services.jobs.service import build
from services.runtime.server import run
from services.runtime.topology import JOBS

if __name__ == "__main__":
    run(JOBS, build)
