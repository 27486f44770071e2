from services.features.service import build
from services.runtime.server import run
from services.runtime.topology import FEATURES

if __name__ == "__main__":
    run(FEATURES, build)
