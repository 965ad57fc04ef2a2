"""`mimi plan`: each small method built for a budget exactly as a run would build it, counted against hand-computed
parameters, with the bytes of its int8 task file (mimi.training.plan)."""

import json
import shlex

import pytest

from mimi.cli import main
from mimi.training.plan import KILOBYTE_CANDIDATES, Candidate, plan_budget

D, DEPTH = 192, 12  # vit_tiny_patch16_224
A1 = 3 * D + 1  # an adapter of hidden size 1: down weights and bias, up weights, output bias


@pytest.fixture(scope="module")
def rows():
    return {r.candidate.label: r for r in plan_budget(4000, model="vit_tiny_patch16_224", num_classes=5)}


def test_each_candidate_is_built_for_the_budget_as_counted_by_hand(rows):
    by_method = {(r.candidate.method, json.dumps(r.candidate.method_kwargs)): r for r in rows.values()}
    fact = by_method[("fact-tt", "{}")]
    # 2 d r + 144 r^2: r=4 gives 3,840, the nearest to 4,000 (r=5: 5,520)
    assert (fact.params, fact.note, fact.fits) == (2 * D * 4 + 144 * 16, "fact_rank 4", True)
    spread = by_method[("adapter", json.dumps({"blocks": "spread"}))]
    assert spread.params == 3 * 2 * A1 <= 4000 < 4 * 2 * A1 and spread.note == "adapter_blocks [0, 6, 11]"
    assert by_method[("adapter", json.dumps({"blocks": "last"}))].note == "adapter_blocks [9, 10, 11]"
    everywhere = by_method[("adapter", "{}")]
    assert (everywhere.params, everywhere.fits) == (DEPTH * 2 * A1, False)  # the smallest uniform adapter
    assert by_method[("vpt-deep", json.dumps({"num_prompts": 1}))].params == DEPTH * D
    assert not by_method[("vpt-deep", json.dumps({"num_prompts": 2}))].fits
    # tokens from the budget: 4,000 // (12 x 192) = 1 token a block
    sized = by_method[("vpt-deep", "{}")]
    assert (sized.params, sized.fits, sized.note) == (DEPTH * D, True, "num_prompts 1")
    assert by_method[("lora", json.dumps({"rank": 1, "targets": ["attn.qkv"]}))].params == DEPTH * (D + 3 * D)
    mimi = by_method[("mimi", "{}")]
    assert (mimi.params, mimi.int8_bytes, mimi.fits) == (4000, None, True)  # sizes found by training
    # VeRA's b vectors on qkv alone are 12 x 576 = 6,912 > 4,000: a row saying so, not an error
    vera = by_method[("peft-vera", "{}")]
    assert vera.params is None and not vera.fits and "6,912" in vera.note


def test_int8_bytes_grow_with_the_trained_parameters_from_the_head_alone(rows):
    head_only = rows["linear probe (the head alone)"]
    assert head_only.params == 0 and head_only.int8_bytes >= 5 * D  # int8 codes of the head at least
    for r in rows.values():
        if r.int8_bytes is not None and r.params:
            extra = r.int8_bytes - head_only.int8_bytes
            assert r.params <= extra <= 2.5 * r.params + 2500, r.candidate.label  # ~1 byte a weight, 2 a vector


def test_the_printed_flags_rebuild_the_candidate():
    for c in KILOBYTE_CANDIDATES:
        words = shlex.split(c.flags())
        assert words[words.index("--method") + 1] == c.method
        kwargs = json.loads(words[words.index("--method-kwargs") + 1]) if "--method-kwargs" in words else {}
        assert kwargs == c.method_kwargs
        dim = int(words[words.index("--adapter-dim") + 1]) if "--adapter-dim" in words else None
        assert dim == c.adapter_dim
    assert (
        Candidate("x", "adapter", {"blocks": [0, 3], "train_norms": False})
        .flags()
        .endswith("""'{"blocks": [0, 3], "train_norms": false}'""")
    )


def test_cli_prints_the_table_and_refuses_a_bad_budget_in_one_line(capsys):
    args = ["plan", "--budget-params", "4000", "--model", "vit_tiny_patch16_224", "--num-classes", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("fact-tt"))
    assert "3,840" in line and "yes" in line and "fact_rank 4" in line
    assert "  --method fact-tt\n" in out and "--method peft-vera\n" not in out  # only what fits is suggested
    assert main([*args, "--json"]) == 0
    listed = {r["candidate"]["label"]: r for r in json.loads(capsys.readouterr().out)}  # nothing but JSON
    assert (
        listed["fact-tt (rank from the budget)"]["params"] == 3840 and listed["linear probe (the head alone)"]["fits"]
    )
    assert listed["fact-tt (rank from the budget)"]["flags"] == "--method fact-tt"
    assert main(["plan", "--budget-params", "0", "--model", "vit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--budget-params must be >= 1" in err and "\n" not in err
