from services.common.server import run
from services.features.service import build
from services.mesh.topology import FEATURES

if __name__ == "__main__":
    run(FEATURES, build)
