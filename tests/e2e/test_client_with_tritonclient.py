"""The infermesh client and an unmodified tritonclient.grpc in one process, against one mesh.

Platform teams already have tritonclient installed; importing our client beside it must not
clash (tritonclient registers the Open Inference Protocol's `inference.*` protobuf symbols,
and so do our scoring stubs). The client runs in a fresh interpreter, as a user's program
would: this test process has already loaded the services' own stubs.
"""

from __future__ import annotations

import json
import subprocess
import sys

from infermesh.up.supervisor import Mesh

PROGRAM = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
from infermesh.client import MeshClient

edge = sys.argv[1]
with MeshClient([edge]) as client:
    result = client.recommend("u42", [f"i{n}" for n in range(200)], k=20)
triton_client = triton.InferenceServerClient(edge)
rows = np.random.default_rng(7).random((8, 64), dtype=np.float32)
features = triton.InferInput("features", list(rows.shape), "FP32")
features.set_data_from_numpy(rows)
scores = triton_client.infer("ranker", [features]).as_numpy("score")
print(json.dumps({
    "items": [item.item_id for item in result.items],
    "model_version": result.model_version,
    "score_shape": list(scores.shape),
    "scores_in_unit_interval": bool(((scores >= 0) & (scores <= 1)).all()),
    "our_oip_stubs_loaded": any(name.startswith("services.genproto.inference") for name in sys.modules),
}))
"""


def test_client_and_tritonclient_in_one_process(mesh: Mesh) -> None:
    edge = f"127.0.0.1:{mesh.topology.edge_port}"
    done = subprocess.run([sys.executable, "-c", PROGRAM, edge], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    assert len(answer["items"]) == 20 and answer["model_version"] == "1"
    assert answer["score_shape"] == [8, 1] and answer["scores_in_unit_interval"]
    # The client needs only the gateway's contract: the OIP stubs stay out of a user's process.
    assert not answer["our_oip_stubs_loaded"]
