from services.common.server import run
from services.mesh.topology import SCORING
from services.scoring.service import build

if __name__ == "__main__":
    run(SCORING, build)
