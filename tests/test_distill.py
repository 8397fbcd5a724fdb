"""The ensemble as a per-batch teacher: exactly the kl rule's q on the batch it is given, softened at T."""

import numpy as np
import torch

from specialkit import distill, ensemble, models, specialists


def _tiny(num_classes: int = 6) -> models.Classifier:
    torch.manual_seed(0)
    cfg = models.ModelConfig(
        name="cnn", num_classes=num_classes, in_channels=1, image_size=8, width=4, depth=2, blocks_per_stage=1
    )
    m = models.build_model(cfg).eval()
    with torch.no_grad():
        m.head.weight.mul_(5.0)
    return m


def test_ensemble_teacher_is_the_kl_rule_on_the_batch(one_thread):
    gen = _tiny()
    groups = [np.array([5, 0, 1]), np.array([2, 3, 4, 5])]  # every class covered: specialists switch on
    trained = []
    for g, shift in zip(groups, (0.3, -0.2)):
        model = specialists.init_from_generalist(gen, g)
        with torch.no_grad():  # make the specialists disagree with the generalist
            model.head.linear.weight.add_(torch.randn_like(model.head.linear.weight))
        trained.append(
            specialists.TrainedSpecialist(
                model=model.eval(),
                classes=g,
                class_names=tuple("abc"[: len(g)]),
                dustbin_shift=shift,
                history=[],
                examples_seen=0,
            )
        )
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = distill.ensemble_teacher(gen, trained, top_n=1, temperature=3.0)(x).double().numpy()
    with torch.no_grad():
        p_gen = torch.softmax(gen(x).double(), 1).numpy()
        outs = [
            ensemble.SpecialistOutputs(
                classes=sp.classes, probs=specialists.apply_dustbin_shift(sp.model(x).double(), sp.dustbin_shift)
            )
            for sp in trained
        ]
    q = ensemble.combine_kl(p_gen, outs, ensemble.activation(p_gen, groups, top_n=1))
    np.testing.assert_allclose(got, distill.soften(q, 3.0), atol=1e-5)
    assert got.shape == (32, 6) and np.allclose(got.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(got, distill.soften(p_gen, 3.0), atol=1e-3)  # the specialists did change the targets
