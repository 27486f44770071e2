from gateway.service import build
from services.common.server import run
from services.mesh.topology import GATEWAY

if __name__ == "__main__":
    run(GATEWAY, build)
