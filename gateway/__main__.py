from gateway.service import build
from services.runtime.server import run
from services.runtime.topology import GATEWAY

if __name__ == "__main__":
    run(GATEWAY, build)
