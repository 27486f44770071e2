from services.runtime.server import run
from services.runtime.topology import RANKING
from services.ranking.service import build

if __name__ == "__main__":
    run(RANKING, build)
