"""HeteroFL aggregation worked by hand on tiny tensors."""

import pytest
import torch

from heterofl_edge.aggregation import HeteroFLAggregator
from heterofl_edge.errors import UpdateError
from heterofl_edge.models import get_architecture
from heterofl_edge.slicing import Dim, TensorRule, extract_submodel_state

# A 2-layer toy: hidden width 16 (so level e keeps 1 unit, b keeps 8), 3 classes.
SPEC = {
    "hidden.weight": TensorRule((Dim.width(16), Dim.fixed(2))),
    "hidden.bias": TensorRule((Dim.width(16),)),
    "out.weight": TensorRule((Dim.labels(3), Dim.width(16))),
    "out.bias": TensorRule((Dim.labels(3),)),
    "stat": TensorRule((Dim.width(16),), trainable=False),
}


def global_state():
    return {
        "hidden.weight": torch.full((16, 2), -1.0),
        "hidden.bias": torch.full((16,), -1.0),
        "out.weight": torch.full((3, 16), -1.0),
        "out.bias": torch.full((3,), -1.0),
        "stat": torch.full((16,), 7.0),
    }


def constant_update(rate, value):
    width = {1.0: 16, 0.5: 8, 0.0625: 1}[rate]
    return {
        "hidden.weight": torch.full((width, 2), value),
        "hidden.bias": torch.full((width,), value),
        "out.weight": torch.full((3, width), value),
        "out.bias": torch.full((3,), value),
    }


def test_three_clients_a_b_e_average_each_element_over_its_holders():
    # Prepare: client a uploads 1s, b uploads 2s, e uploads 6s; e holds labels {0, 1} only.
    agg = HeteroFLAggregator(global_state(), SPEC)
    agg.add(constant_update(1.0, 1.0), 1.0, labels=[0, 1, 2])
    agg.add(constant_update(0.5, 2.0), 0.5, labels=[0, 1, 2])
    agg.add(constant_update(0.0625, 6.0), 0.0625, labels=[0, 1])

    # Execute
    new = agg.finalize()

    # Assert: unit 0 is held by a, b, e -> (1+2+6)/3 = 3;
    # units 1..7 by a, b -> 1.5; units 8..15 by a alone -> 1.
    expected_hidden = torch.tensor([3.0] + [1.5] * 7 + [1.0] * 8)
    assert torch.equal(new["hidden.bias"], expected_hidden)
    assert torch.equal(new["hidden.weight"], expected_hidden[:, None].expand(16, 2))
    # Classifier rows 0 and 1: column 0 from a, b, e; row 2 (label e lacks): column 0 from a, b.
    expected_out = torch.stack(
        [expected_hidden, expected_hidden, torch.tensor([1.5] * 8 + [1.0] * 8)]
    )
    assert torch.equal(new["out.weight"], expected_out)
    assert torch.equal(new["out.bias"], torch.tensor([3.0, 3.0, 1.5]))
    # Non-trainable tensors pass through untouched.
    assert torch.equal(new["stat"], torch.full((16,), 7.0))


def test_elements_no_client_holds_keep_their_value():
    agg = HeteroFLAggregator(global_state(), SPEC)
    agg.add(constant_update(0.5, 2.0), 0.5, labels=[1])
    new = agg.finalize()
    assert torch.equal(new["hidden.bias"], torch.tensor([2.0] * 8 + [-1.0] * 8))
    assert torch.equal(new["out.bias"], torch.tensor([-1.0, 2.0, -1.0]))
    assert torch.equal(new["out.weight"][0], torch.full((16,), -1.0))
    assert torch.equal(new["out.weight"][1], torch.tensor([2.0] * 8 + [-1.0] * 8))


def test_one_level_a_client_alone_gives_back_exactly_its_weights():
    arch = get_architecture("conv")
    start = arch.build(1.0).state_dict()
    torch.manual_seed(1)
    trained = {n: torch.randn_like(p) for n, p in arch.build(1.0).named_parameters()}
    agg = HeteroFLAggregator(start, arch.spec)
    agg.add(trained, 1.0, labels=range(10))
    new = agg.finalize()
    for name, tensor in trained.items():
        assert torch.equal(new[name], tensor), name


def test_upload_order_does_not_matter():
    updates = [
        (constant_update(1.0, 0.1), 1.0),
        (constant_update(0.5, 0.7), 0.5),
        (constant_update(0.0625, 0.3), 0.0625),
    ]
    results = []
    for order in (updates, updates[::-1]):
        agg = HeteroFLAggregator(global_state(), SPEC)
        for update, rate in order:
            agg.add(update, rate)
        results.append(agg.finalize())
    for name in SPEC:
        assert torch.equal(results[0][name], results[1][name])


def test_extracted_submodel_is_the_upper_left_slice():
    state = {
        k: torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape)
        for k, v in global_state().items()
    }
    sub = extract_submodel_state(state, SPEC, 0.5)
    assert torch.equal(sub["hidden.weight"], state["hidden.weight"][:8, :2])
    assert torch.equal(sub["out.weight"], state["out.weight"][:3, :8])
    sub["hidden.weight"] += 1  # a copy: the global state is not touched
    assert torch.equal(state["hidden.weight"][0], torch.tensor([0.0, 1.0]))


def test_per_head_slicing_keeps_each_head_inside_its_global_head():
    spec = {"q": TensorRule((Dim.per_head(8, 2), Dim.fixed(1)))}
    state = {"q": torch.arange(8, dtype=torch.float32).reshape(8, 1)}
    sub = extract_submodel_state(state, spec, 0.5)
    assert sub["q"].flatten().tolist() == [0.0, 1.0, 4.0, 5.0]
    agg = HeteroFLAggregator(state, spec)
    agg.add({"q": torch.full((4, 1), 9.0)}, 0.5)
    assert agg.finalize()["q"].flatten().tolist() == [9.0, 9.0, 2.0, 3.0, 9.0, 9.0, 6.0, 7.0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda u: u.pop("out.bias"), "missing"),
        (lambda u: u.update(extra=torch.zeros(1)), "unexpected"),
        (lambda u: u.update({"hidden.bias": torch.zeros(9)}), "shape"),
        (lambda u: u.update({"hidden.bias": torch.zeros(8, dtype=torch.float64)}), "dtype"),
        (lambda u: u.update({"hidden.bias": torch.full((8,), float("nan"))}), "NaN"),
        (lambda u: u.update({"out.bias": torch.tensor([0.0, float("inf"), 0.0])}), "NaN or Inf"),
    ],
)
def test_bad_updates_are_refused_and_change_nothing(change, message):
    agg = HeteroFLAggregator(global_state(), SPEC)
    agg.add(constant_update(1.0, 1.0), 1.0)
    update = constant_update(0.5, 5.0)
    change(update)
    with pytest.raises(UpdateError, match=message):
        agg.add(update, 0.5)
    assert agg.num_updates == 1
    assert torch.equal(agg.finalize()["hidden.bias"], torch.ones(16))


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]])
def test_out_of_range_label_is_refused_and_changes_nothing(labels):
    agg = HeteroFLAggregator(global_state(), SPEC)
    with pytest.raises(UpdateError, match=r"labels must lie in 0\.\.2"):
        agg.add(constant_update(1.0, 1.0), 1.0, labels=labels)
    assert agg.num_updates == 0
    assert torch.equal(agg.finalize()["hidden.bias"], global_state()["hidden.bias"])
