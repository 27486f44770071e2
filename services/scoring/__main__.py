from services.runtime.server import run
from services.runtime.topology import SCORING
from services.scoring.service import build

if __name__ == "__main__":
    run(SCORING, build)
