"""The whole zoo, folded and verified end to end."""

import pytest
import torch

import bnfold
import models
from tests.bnfold.bn_helpers import count_bn_modules

# Zoo models with BNs that eval mode cannot fold exactly (everything else must fold):
# pre-activation blocks run BN -> ReLU on a sum, with no affine producer and a nonlinearity
# before the consumer.
EXPECTED_KEPT = {"preact_net": 3}


@pytest.mark.parametrize("name", models.names())
def test_zoo_model_folds_and_verifies(name):
    model = models.build(name)
    inputs = models.example_inputs(name, batch=4)
    result = bnfold.fold(model, inputs)
    check = bnfold.verify(model, result.module, inputs, rtol=1e-5, atol=1e-6)
    assert check.ok, check.summary()
    counts = result.report.counts()
    assert counts["total"] == count_bn_modules(model)
    assert counts["kept"] == EXPECTED_KEPT.get(name, 0), result.report.summary()
    for entry in result.report.kept:
        assert entry.reason  # every BN left has a reason a user can read


def test_mlp_bn_after_activation_folds_forward():
    result = bnfold.fold(
        models.build("mlp_bn_after_act"), models.example_inputs("mlp_bn_after_act")
    )
    counts = result.report.counts()
    # 300-200-100-50-10: a BN after each of the three hidden activations
    assert counts["folded_forward"] == 3 and counts["kept"] == 0


def test_zoo_model_folded_in_place_of_batch_size_one():
    model = models.build("resnet_small")
    result = bnfold.fold(model, models.example_inputs("resnet_small", batch=2))
    x = models.example_inputs("resnet_small", batch=1)
    with torch.no_grad():
        torch.testing.assert_close(result.module(*x), model(*x), rtol=1e-5, atol=1e-5)
