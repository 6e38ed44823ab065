"""The detector contract: what the server and clients rely on from a detector plugin.

Subclass :class:`DetectorContract`, parametrize it with your plugin's name and
give it a *small* config (the suite trains for real, on the CPU)::

    import pytest
    from fedplug.testing import DetectorContract

    pytest_plugins = ["fedplug.testing.plugin"]

    @pytest.mark.parametrize("detector_name", ["my_det"])
    class TestMyDetector(DetectorContract):
        @pytest.fixture
        def detector_config(self, detector_name):
            return {"name": detector_name, "variant": "tiny", "seed": 0}

The suite builds the model through ``fedplug_build_model``, trains one round on
two in-memory images of coloured rectangles (``detector_image_size``, default
80×96 px), evaluates, and checks the proximal (FedProx) setting.  One training
run is shared by the checks that only read its result; the proximal check
trains twice more and is marked ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, ClassVar, Sequence

import pytest
import torch

from fedplug.testing import checks
from fedplug.testing.data import SyntheticDetectionDataset, clone_state
from fedplug.testing.loading import check_config_file, default_config, plugin_identity, plugin_manager
from fedplug.types import DetectionStats, EvalResult, EvalSettings, TrainResult, TrainSettings


def slow(function):
    """Mark a check ``slow``; ``fedplug.testing.plugin`` turns this into the pytest marker.

    (Applying ``pytest.mark.slow`` here, at import time, would warn about an
    unknown marker before the plugin had a chance to register it.)
    """
    function._fedplug_slow = True
    return function


class _PoisonedDataset(torch.utils.data.Dataset):
    """Every image is NaN: any honest loss on it is non-finite."""

    def __init__(self, base: torch.utils.data.Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, target = self.base[index]
        return torch.full_like(image, float("nan")), target


class DetectorContract:
    """Checks every detector must pass; see the module docstring for use.

    ``detector_image_size`` is ``(height, width)`` of the synthetic images.
    The proximal check trains twice with plain SGD at ``proximal_lr`` for
    ``proximal_epochs`` epochs of batch size 1 (4 steps on 2 images): once with
    ``proximal_mu=0`` and once with ``proximal_mu=1/proximal_lr``.
    """

    detector_image_size: ClassVar[tuple[int, int]] = (80, 96)
    detector_num_images: ClassVar[int] = 2
    proximal_epochs: ClassVar[int] = 2
    proximal_lr: ClassVar[float] = 1e-4

    # -- fixtures a subclass provides or overrides -------------------------

    @pytest.fixture
    def detector_name(self) -> str:
        pytest.fail(
            "parametrize the suite with your plugin's name: "
            '@pytest.mark.parametrize("detector_name", ["<name>"])'
        )

    @pytest.fixture
    def detector_plugin(self) -> object | None:
        """``None``: load the plugin by name from its entry point; else this object is the plugin."""
        return None

    @pytest.fixture
    def detector_config(self, detector_name: str) -> dict[str, Any]:
        """The ``model`` config the detector is built with; override it with a tiny variant."""
        return default_config("detector", detector_name)

    @pytest.fixture
    def detector_class_names(self) -> tuple[str, ...]:
        return ("red_box", "green_box")

    @pytest.fixture
    def detector_train_settings(self) -> TrainSettings:
        return TrainSettings(
            round_number=1, local_epochs=1, batch_size=2, lr=0.01, momentum=0.9,
            weight_decay=0.0, device="cpu", seed=0, max_grad_norm=10.0,
        )

    @pytest.fixture
    def detector_eval_settings(self) -> EvalSettings:
        return EvalSettings(batch_size=2, device="cpu")

    @pytest.fixture
    def detector_dataset(self, fedplug_make_detection_dataset, detector_class_names) -> SyntheticDetectionDataset:
        return fedplug_make_detection_dataset(
            count=self.detector_num_images, num_classes=len(detector_class_names), size=self.detector_image_size
        )

    @pytest.fixture
    def detector_hook(self, detector_name: str, detector_plugin: object | None):
        return plugin_manager("detector", detector_name, detector_plugin).hook

    @pytest.fixture
    def build(self, detector_hook, detector_config) -> Callable[..., torch.nn.Module]:
        """Call ``fedplug_build_model`` as the server and the clients do."""
        config = dict(detector_config)
        if not isinstance(config.get("seed"), int):  # e.g. an unresolved ${run.seed}
            config["seed"] = 0

        def call(class_names: Sequence[str], **overrides) -> torch.nn.Module:
            model = detector_hook.fedplug_build_model(config={**config, **overrides}, class_names=list(class_names))
            assert model is not None, "no fedplug_build_model implementation answered (it returned None)"
            assert isinstance(model, torch.nn.Module), (
                f"fedplug_build_model returned a {type(model).__module__}.{type(model).__qualname__}; "
                "it must return a torch.nn.Module"
            )
            return model

        return call

    @pytest.fixture
    def train(self, detector_hook, build, detector_class_names, detector_dataset, detector_train_settings):
        """Build a fresh model and train one round; returns ``(global_weights, model, TrainResult)``."""

        def call(settings: TrainSettings | None = None, dataset=None):
            model = build(detector_class_names)
            global_weights = clone_state(model.state_dict())
            result = detector_hook.fedplug_train_round(
                model=model,
                dataset=detector_dataset if dataset is None else dataset,
                settings=settings or detector_train_settings,
                global_weights=global_weights,
                state={},
            )
            assert result is not None, "no fedplug_train_round implementation answered (it returned None)"
            assert isinstance(result, TrainResult), (
                f"fedplug_train_round returned a {type(result).__module__}.{type(result).__qualname__}; "
                "it must return a fedplug.types.TrainResult"
            )
            assert isinstance(result.ok, bool), f"TrainResult.ok is {result.ok!r}, not a bool"
            if result.ok:
                checks.assert_is_state_dict(result.weights, "TrainResult.weights")
            return global_weights, model, result

        return call

    @pytest.fixture
    def trained(self, train, fedplug_cache, detector_name, detector_plugin, detector_config,
                detector_class_names, detector_train_settings):
        """One training round shared by the read-only checks (computed once per plugin and config)."""
        key = (
            "detector-train", detector_name, plugin_identity(detector_plugin),
            json.dumps(detector_config, sort_keys=True, default=str),
            tuple(detector_class_names), repr(detector_train_settings),
        )
        if key not in fedplug_cache:
            torch.manual_seed(0)
            fedplug_cache[key] = train()
        return fedplug_cache[key]

    # -- the config file -------------------------------------------------------

    def test_config_file_composes(self, detector_name):
        """``model/<name>.yaml`` composes into fedplug's config as a run composes it (skipped without one).

        It must start with ``# @package _global_`` and hold the detector's
        settings under ``model:``, with ``model.name`` the plugin's name.
        """
        check_config_file("detector", detector_name)

    # -- building -------------------------------------------------------------

    def test_builds_a_cpu_module(self, build, detector_class_names):
        model = build(detector_class_names)
        assert isinstance(model, torch.nn.Module), f"fedplug_build_model returned {type(model).__name__}"
        state = model.state_dict()
        assert state, "the model's state_dict() is empty"
        checks.assert_is_state_dict(state, "state_dict()")
        for name, t in state.items():
            assert t.device.type == "cpu", f"{name} is on {t.device}; build on the CPU, clients move it"
        assert any(p.requires_grad for p in model.parameters()), "the model has no trainable parameter"

    def test_build_follows_class_count(self, build, detector_class_names):
        n = build(detector_class_names).state_dict()
        more = build(list(detector_class_names) + ["extra_class"]).state_dict()
        shapes_n = {k: tuple(v.shape) for k, v in n.items()}
        shapes_more = {k: tuple(v.shape) for k, v in more.items()}
        assert shapes_n != shapes_more, (
            f"building for {len(detector_class_names)} and {len(detector_class_names) + 1} classes "
            "gave the same architecture: class_names is ignored"
        )

    def test_build_is_deterministic_for_a_seed(self, build, detector_class_names):
        # The global RNG must not matter: config["seed"] decides.
        with torch.random.fork_rng():
            torch.manual_seed(1)
            first = build(detector_class_names).state_dict()
            torch.manual_seed(12345)
            second = build(detector_class_names).state_dict()
        checks.assert_states_equal(second, first, "second build with the same config")

    def test_weights_round_trip_exactly(self, build, detector_class_names):
        model = build(detector_class_names)
        original = clone_state(model.state_dict())
        try:
            decoded = checks.wire_round_trip(model.state_dict())
        except Exception as exc:
            pytest.fail(f"the model's state_dict() does not survive the wire format: {type(exc).__name__}: {exc}")
        # A model built from another seed: loading must replace every value.
        fresh = build(detector_class_names, seed=12345)
        fresh.load_state_dict(decoded, strict=True)
        checks.assert_states_equal(fresh.state_dict(), original, "weights after encode/decode/load")

    # -- training -------------------------------------------------------------

    def test_train_round_gives_finite_loss(self, trained, detector_dataset):
        global_weights, model, result = trained
        assert isinstance(result, TrainResult), f"fedplug_train_round returned {type(result).__name__}"
        assert result.ok, f"training failed: {result.reason}"
        assert isinstance(result.train_loss, (int, float)) and math.isfinite(result.train_loss), (
            f"train_loss is {result.train_loss!r}"
        )
        assert result.num_examples == len(detector_dataset), (
            f"num_examples is {result.num_examples}, the dataset has {len(detector_dataset)} samples"
        )
        checks.assert_same_layout(result.weights, global_weights, "TrainResult.weights")
        checks.assert_finite(result.weights, "TrainResult.weights")

    def test_train_round_changes_weights(self, trained):
        global_weights, model, result = trained
        assert result.ok, f"training failed: {result.reason}"
        changed = checks.states_differ(result.weights, global_weights)
        assert changed, "one training round left every weight unchanged"

    def test_train_round_leaves_global_weights_untouched(self, build, detector_class_names, trained):
        global_weights, model, result = trained
        # global_weights was cloned from a fresh build with the same seed; it must still equal one.
        checks.assert_states_equal(global_weights, build(detector_class_names).state_dict(), "global_weights after training")

    def test_trained_weights_round_trip_exactly(self, build, detector_class_names, trained):
        global_weights, _, result = trained
        assert result.ok, f"training failed: {result.reason}"
        try:
            decoded = checks.wire_round_trip(result.weights, global_weights)
        except Exception as exc:
            pytest.fail(f"TrainResult.weights do not survive the wire format: {type(exc).__name__}: {exc}")
        checks.assert_states_equal(decoded, dict(result.weights), "trained weights after a wire round trip")
        fresh = build(detector_class_names)
        fresh.load_state_dict(decoded, strict=True)
        checks.assert_states_equal(fresh.state_dict(), dict(result.weights), "trained weights loaded into a new model")

    def test_non_finite_loss_is_reported_not_raised(self, train, detector_dataset):
        try:
            _, _, result = train(dataset=_PoisonedDataset(detector_dataset))
        except Exception as exc:
            pytest.fail(f"training on NaN images raised {type(exc).__name__}: {exc}; return ok=False instead")
        assert isinstance(result, TrainResult)
        assert not result.ok, (
            f"training on NaN images returned ok=True with train_loss={result.train_loss!r}; "
            "a non-finite loss must give ok=False"
        )
        assert result.reason, "ok=False needs a reason"

    @slow
    def test_proximal_mu_is_honoured(self, train, detector_train_settings):
        # Plain SGD with a small lr keeps training in its smooth regime, where successive
        # gradients are alike; lr * mu = 1 then pulls the weights all the way back to the
        # global ones at every step, so with mu they stay about one step away while without
        # it they drift further every step.
        base = dataclasses.replace(
            detector_train_settings, local_epochs=self.proximal_epochs, batch_size=1, lr=self.proximal_lr,
            momentum=0.0, weight_decay=0.0, max_grad_norm=0.0, optimizer="sgd", warmup_iters=0,
        )
        mu = 1.0 / base.lr
        distances = {}
        for value in (0.0, mu):
            torch.manual_seed(0)
            global_weights, model, result = train(dataclasses.replace(base, proximal_mu=value))
            assert result.ok, f"training with proximal_mu={value} failed: {result.reason}"
            trainable = [n for n, p in model.named_parameters() if p.requires_grad and n in result.weights]
            distances[value] = checks.float_distance(result.weights, global_weights, trainable)
        assert distances[0.0] > 0, "training without the proximal term did not move the weights"
        assert distances[mu] < 0.8 * distances[0.0], (
            f"with proximal_mu={mu} the weights moved {distances[mu]:.3g} from the global weights, "
            f"against {distances[0.0]:.3g} with mu=0: the proximal term is ignored"
        )

    # -- evaluation -------------------------------------------------------------

    def test_evaluate_returns_documented_metrics(self, detector_hook, build, detector_class_names,
                                                 detector_dataset, detector_eval_settings):
        model = build(detector_class_names)
        result = detector_hook.fedplug_evaluate(model=model, dataset=detector_dataset, settings=detector_eval_settings)
        assert isinstance(result, EvalResult), f"fedplug_evaluate returned {type(result).__name__}"
        assert result.num_examples == len(detector_dataset), (
            f"EvalResult.num_examples is {result.num_examples!r}; the test set has {len(detector_dataset)} images"
        )
        for field in ("loss", "map50", "recall"):
            value = getattr(result, field)
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (
                f"EvalResult.{field} is {value!r} ({type(value).__name__}); it must be a float"
            )
        assert math.isfinite(result.loss), f"test loss is {result.loss!r}"
        assert 0.0 <= result.map50 <= 1.0, f"map50 is {result.map50!r}, outside [0, 1]"
        assert 0.0 <= result.recall <= 1.0, f"recall is {result.recall!r}, outside [0, 1]"
        stats = result.stats
        assert isinstance(stats, DetectionStats), "EvalResult.stats must hold the mergeable DetectionStats"
        n = len(detector_class_names)
        assert stats.num_classes == n, f"stats cover {stats.num_classes} classes, the model has {n}"
        # from_json checks list lengths and counts, as the server does on a client's message.
        try:
            DetectionStats.from_json(stats.to_json())
        except (TypeError, ValueError) as exc:
            pytest.fail(f"EvalResult.stats would be refused by the server: {exc}")
        assert stats.num_ground_truth == detector_dataset.ground_truth_per_class(), (
            f"num_ground_truth is {stats.num_ground_truth}; the test set has "
            f"{detector_dataset.ground_truth_per_class()} boxes per class"
        )
        for c in range(n):
            assert all(math.isfinite(s) for s in stats.scores[c]), f"class {c} has non-finite scores"
