"""Tensors through the object store: one shared copy, read-only views for readers, private copies when written."""

from __future__ import annotations

import pytest
import torch

from actors.object_store import get_tensors, put_tensors

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(120)]


def test_a_nested_state_comes_back_equal_as_views_or_as_copies():
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)  # 1 MiB: Ray keeps it in shared memory (small objects are inlined)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "bf16": torch.ones(2, dtype=torch.bfloat16)}
    ref = put_tensors(state)
    read = get_tensors(ref)
    assert torch.equal(read["model"]["weight"], state["model"]["weight"])
    assert read["bf16"].dtype == torch.bfloat16  # no NumPy dtype: pickled as it was
    # views of the object store's one copy, not a private copy per reader: two reads see the same memory ...
    again = get_tensors(ref)
    assert read["model"]["weight"].data_ptr() == again["model"]["weight"].data_ptr()
    live = get_tensors(ref, writable=True)  # ... unless it is to be written
    assert live["optimizer"]["state"][0]["exp_avg"].data_ptr() != read["optimizer"]["state"][0]["exp_avg"].data_ptr()
    restored = torch.optim.AdamW(model.parameters())
    restored.load_state_dict(live["optimizer"])
    model(torch.randn(2, 512)).sum().backward()
    restored.step()  # the moments are its own: stepping writes them
    moment = restored.state_dict()["state"][0]["exp_avg"]
    assert not torch.equal(moment, state["optimizer"]["state"][0]["exp_avg"])


def test_the_carried_state_is_in_one_place_at_a_time():
    from actors.object_store import CarriedState, get_tensors

    state = {"model": {"w": torch.arange(4.0)}, "optimizer": None}
    carried = CarriedState(state)
    assert carried.state is state and carried.weights is None
    ref = carried.publish()
    with pytest.raises(RuntimeError, match="in the object store while an iteration runs"):
        carried.state  # noqa: B018 - the property raises
    assert carried.weights is ref and carried.optimizer is None
    assert torch.equal(get_tensors(ref)["w"], torch.arange(4.0))
    new = {"model": {"w": torch.zeros(4)}, "optimizer": {"state": {}}}
    carried.replace(new)
    assert carried.state is new and carried.weights is None and carried.optimizer is None
