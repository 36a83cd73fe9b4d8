"""The budget-profile tool end to end on a tiny setting: real model, real server, a profile the
server's loader accepts (protobuf's JSON mapping of BudgetProfile)."""
import json

import numpy as np
from google.protobuf import json_format

from kvcompact.eval import profile
from kvcompact.proto import pb


def test_profile_tool_writes_a_loadable_profile_and_its_sweep(server_address, tmp_path, data_dir):
    out, sweep = tmp_path / "p.json", tmp_path / "sweep.json"
    profile.main(["--server", server_address, "--model", "smollm2", "--out", str(out), "--sweep-out", str(sweep),
                  "--data", data_dir, "--first-article", "0", "--articles", "1", "--questions", "1", "--max-context", "200",
                  "--answer-tokens", "8", "--ratios", "8"])
    parsed = json_format.Parse(open(out).read(), pb.BudgetProfile())
    assert parsed.name == "smollm2-135m-instruct" and parsed.num_layers == 30 and parsed.num_kv_heads == 3
    shares = np.array(parsed.shares)
    assert shares.shape == (90,) and np.all(shares > 0) and abs(shares.sum() - 1) < 1e-4
    losses = np.array(json.load(open(sweep))["loss_per_ratio"]["8.0"])
    assert losses.shape == (30, 3) and np.all(np.isfinite(losses))
    # The head that lost the most gets the largest share.
    assert int(np.argmax(shares)) == int(np.argmax(np.maximum(losses, 0).ravel()))
