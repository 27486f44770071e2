from services.common.server import run
from services.mesh.topology import RANKING
from services.ranking.service import build

if __name__ == "__main__":
    run(RANKING, build)
