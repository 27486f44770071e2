from services.ranking.service import build
from services.runtime.server import run
from services.runtime.topology import RANKING

if __name__ == "__main__":
    run(RANKING, build)
