"""dagster-webserver on 127.0.0.1 loads the project's definitions: every canonical asset and
check is there, and the code location has no load error, asked over GraphQL as the UI does."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

ASSETS = {
    "scorer_model", "vae_model", "raw_prompts", "content_style", "synthetic_images", "pickscore_scores",
    "filtered_synthetic", "real_images", "detections", "multimodal_captions_stage1", "multimodal_captions_stage2",
    "stage1_model", "stage2_model", "evaluation",
}
CHECKS = {
    ("raw_prompts", "nonempty_unique"), ("content_style", "styles_per_content"),
    ("synthetic_images", "all_pairs_rendered"), ("pickscore_scores", "scores_finite"),
    ("filtered_synthetic", "kept_fraction"), ("detections", "boxes_well_formed"),
    ("multimodal_captions_stage1", "records_parse"), ("multimodal_captions_stage2", "records_parse"),
    ("evaluation", "meets_targets"),
}

QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
  assetNodes {
    assetKey { path }
    isMaterializable
    assetChecksOrError { __typename ... on AssetChecks { checks { name } } }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("profile", ["toy", "paper"])
def test_webserver_loads_every_asset_and_check(profile, tmp_path):
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "MUMU_PROFILE": profile}
    # Its own process group: the webserver starts a code server child; both must go at the end.
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-m", "mumu_assets.definitions",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        answer = None
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"dagster-webserver exited with {server.returncode}: {server.stderr.read().decode()[-2000:]}")
            try:
                answer = _graphql(port, QUERY)
                if answer.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert answer and "errors" not in answer, answer
        data = answer["data"]
        [location] = data["workspaceOrError"]["locationEntries"]
        assert location["locationOrLoadError"]["__typename"] == "RepositoryLocation", location

        nodes = {"/".join(node["assetKey"]["path"]): node for node in data["assetNodes"]}
        assert set(nodes) == ASSETS
        # The pretrained group is trained by the graph in the toy world, declared in the paper's.
        assert nodes["vae_model"]["isMaterializable"] == (profile == "toy")
        assert all(nodes[name]["isMaterializable"] for name in ASSETS - {"vae_model", "scorer_model"})
        checks = {
            (name, check["name"])
            for name, node in nodes.items()
            if node["assetChecksOrError"]["__typename"] == "AssetChecks"
            for check in node["assetChecksOrError"]["checks"]
        }
        assert checks == CHECKS
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
