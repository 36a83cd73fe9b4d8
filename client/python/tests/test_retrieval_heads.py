"""The retrieval-head tool on the real SmolLM2 weights: copied tokens found with their sources,
scores that are attention weights, a few heads far above the rest, and a profile the server's
loader accepts."""
import numpy as np
from google.protobuf import json_format

from kvcompact.eval import retrieval_heads
from kvcompact.proto import pb
from kvcompact.runtime import LlamaModel


def test_a_few_heads_carry_the_copy_and_get_the_largest_shares(tmp_path):
    model = LlamaModel()
    records = retrieval_heads.make_records(np.random.default_rng(1), 12)
    assert len({r.split(":")[0] for r in records}) == 12
    scores, copied = retrieval_heads.head_scores(model, records, 5)
    assert copied >= 3  # the record's number and word, token by token
    per_token = scores / copied
    assert per_token.shape == (30, 3) and np.all(per_token >= 0) and np.all(per_token <= 1)
    # Copying is done by few heads: the best reads its source with far more weight than the median head.
    assert per_token.max() > 0.1 and per_token.max() > 20 * np.median(per_token)

    out = tmp_path / "retrieval.json"
    retrieval_heads.main(["--model", "smollm2", "--out", str(out), "--documents", "1", "--records", "12",
                          "--floor", "1"])
    parsed = json_format.Parse(open(out).read(), pb.BudgetProfile())
    assert parsed.name == "smollm2-135m-instruct-retrieval" and parsed.model == "SmolLM2-135M-Instruct"
    assert parsed.num_layers == 30 and parsed.num_kv_heads == 3
    shares = np.array(parsed.shares)
    assert shares.shape == (90,) and np.all(shares > 0) and abs(shares.sum() - 1) < 1e-4
    assert shares.max() > 5 * np.median(shares)
