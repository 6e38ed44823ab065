"""Meta-tests: the contract suites catch the defects they exist to catch.

Each role's suite is run (with pytest's ``pytester``) over a correct reference
plugin and over deliberately broken ones, registered as objects (no install).
A correct plugin must pass every check; each broken plugin must fail the check
written for its defect, and every check must catch at least one defect.  The
toy plugins' config files come from a config package declared by a fake
distribution (``TOY_CONFIGS``), so the config-file checks see them as a run
would.  Defects of the hook contract itself (a missing or undecorated hook, a
misspelt hook name, an observer with a role hook) are also shown to be refused
by :func:`fedplug.plugins.activate`, with the message a run prints.  One
inner session runs every suite over every toy plugin; its outcomes are shared
by the tests below.
"""

from __future__ import annotations

import textwrap
from xml.etree import ElementTree

import pytest
import torch

pytest_plugins = ["pytester"]

torch.set_num_threads(1)

# ---------------------------------------------------------------------------
# The plugins, as a module the inner session imports
# ---------------------------------------------------------------------------

TOY_PLUGINS = r'''
"""Reference plugins and deliberately broken variants, one defect each."""
import math
import random
import time

import torch

from fedplug.hooks import hookimpl
from fedplug.types import (
    DetectionStats, EmptyRoundError, EvalResult, ResourceDecision, ResourceReport, TrainResult,
)


# ----------------------------------------------------------------- aggregators

class FedAvg:
    """Correct: streaming example-weighted mean, float64 accumulator, integer buffers rounded."""

    def finish(self, acc, total, global_weights):
        out = {}
        for name, ref in global_weights.items():
            mean = acc[name] / total
            out[name] = mean.round().to(ref.dtype) if not ref.is_floating_point() else mean.to(ref.dtype)
        return out

    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        acc, total = None, 0
        for u in updates:
            if acc is None:
                acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_weights.items()}
            for k, v in u.weights.items():
                acc[k] += u.num_examples * v.double()
            total += u.num_examples
        if acc is None:
            raise EmptyRoundError("no update this round")
        state["rounds"] = state.get("rounds", 0) + 1
        return self.finish(acc, total, global_weights)


class MutatesInput(FedAvg):
    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        updates = list(updates)
        result = FedAvg.fedplug_aggregate(self, global_weights, updates, state)
        for k, v in updates[0].weights.items():
            v.copy_(result[k])  # "reuse the first update's buffers to save memory"
        return updates[0].weights


class DropsKey(FedAvg):
    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        result = FedAvg.fedplug_aggregate(self, global_weights, updates, state)
        result.pop("head.bias")
        return result


class ChangesDtype(FedAvg):
    def finish(self, acc, total, global_weights):
        return {k: (v / total).float() for k, v in acc.items()}  # int64 counter becomes float32


class NonDeterministic(FedAvg):
    def finish(self, acc, total, global_weights):
        out = FedAvg.finish(self, acc, total, global_weights)
        return {k: v + 1e-4 * torch.randn(v.shape) if v.is_floating_point() else v for k, v in out.items()}


class TwoPass(FedAvg):
    """Iterates the updates twice: fine on a list, wrong on the server's one-shot stream."""

    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        total = sum(u.num_examples for u in updates)
        if total == 0:
            raise EmptyRoundError("no update this round")
        acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in global_weights.items()}
        for u in updates:
            for k, v in u.weights.items():
                acc[k] += u.num_examples * v.double()
        return self.finish(acc, total, global_weights)


class UsesLen(FedAvg):
    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        if len(updates) == 0:  # a stream has no len()
            raise EmptyRoundError("no update this round")
        return FedAvg.fedplug_aggregate(self, global_weights, updates, state)


class FirstOnly(FedAvg):
    """Takes the first update that arrives and ignores the rest of the round."""

    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        for u in updates:
            return {k: v.clone() for k, v in u.weights.items()}
        raise EmptyRoundError("no update this round")


class SilentOnEmpty(FedAvg):
    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        try:
            return FedAvg.fedplug_aggregate(self, global_weights, updates, state)
        except EmptyRoundError:
            return {k: v.clone() for k, v in global_weights.items()}


class KeepsUpdatesInState(FedAvg):
    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        updates = list(updates)
        state["history"] = updates  # ClientUpdate objects: the server cannot checkpoint them
        return FedAvg.fedplug_aggregate(self, global_weights, updates, state)


class SparseResult(FedAvg):
    """"Compresses" the result as sparse tensors, which the wire format cannot carry."""

    def finish(self, acc, total, global_weights):
        out = FedAvg.finish(self, acc, total, global_weights)
        return {k: v.to_sparse() if v.dim() == 2 else v for k, v in out.items()}


class CountsGlobalAsClient(FedAvg):
    """Averages the global model in as one more client (a "stabilising" prior)."""

    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        result = FedAvg.fedplug_aggregate(self, global_weights, updates, state)
        return {k: ((v.double() + global_weights[k].double()) / 2).to(v.dtype) for k, v in result.items()}


class ServerWeightDecay(FedAvg):
    def finish(self, acc, total, global_weights):
        out = FedAvg.finish(self, acc, total, global_weights)
        return {k: v * 0.99 if v.is_floating_point() else v for k, v in out.items()}


class GeometricMean(FedAvg):
    """Weighted geometric mean: undefined (NaN) for negative weights."""

    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        updates = list(updates)
        result = FedAvg.fedplug_aggregate(self, global_weights, updates, state)
        total = sum(u.num_examples for u in updates)
        for k, ref in global_weights.items():
            if ref.is_floating_point():
                logs = sum(u.num_examples * torch.log(u.weights[k].double()) for u in updates)
                result[k] = torch.exp(logs / total).to(ref.dtype)
        return result


class OwnDeadline(FedAvg):
    """Stops taking updates 5 ms after the first one: the server, not the aggregator, closes a round."""

    @hookimpl
    def fedplug_aggregate(self, global_weights, updates, state):
        def until_deadline():
            start = None
            for u in updates:
                if start is not None and time.perf_counter() - start > 0.005:
                    return
                start = start or time.perf_counter()
                yield u
        return FedAvg.fedplug_aggregate(self, global_weights, until_deadline(), state)


class MissingHook:
    """Implements only the optional hook: an aggregator without fedplug_aggregate."""

    @hookimpl
    def fedplug_aggregator_round_settings(self, round_number, config):
        return None


class Undecorated(FedAvg):
    """fedplug_aggregate without @hookimpl: pluggy would never call it."""

    def fedplug_aggregate(self, global_weights, updates, state):
        return FedAvg.fedplug_aggregate(self, global_weights, updates, state)


class ReturnsList(FedAvg):
    """Returns the tensors as a list: a wrong return type, which must fail with a message, not a TypeError."""

    def finish(self, acc, total, global_weights):
        return list(FedAvg.finish(self, acc, total, global_weights).values())


AGGREGATORS = {
    "fedavg_ok": FedAvg,
    "missing_hook": MissingHook,
    "undecorated": Undecorated,
    "returns_list": ReturnsList,
    "misnamed_file": FedAvg,  # correct code; its aggregator/misnamed_file.yaml says name: misnamed
    "counts_global_as_client": CountsGlobalAsClient,
    "server_weight_decay": ServerWeightDecay,
    "geometric_mean": GeometricMean,
    "own_deadline": OwnDeadline,
    "mutates_input": MutatesInput,
    "drops_key": DropsKey,
    "changes_dtype": ChangesDtype,
    "non_deterministic": NonDeterministic,
    "two_pass": TwoPass,
    "uses_len": UsesLen,
    "first_only": FirstOnly,
    "silent_on_empty": SilentOnEmpty,
    "keeps_updates_in_state": KeepsUpdatesInState,
    "sparse_result": SparseResult,
}


# ----------------------------------------------------------------- resource policies

class Threshold:
    """Correct: clients under load 0.5 qualify; the round starts with at least one."""

    @hookimpl
    def fedplug_measure_resources(self, config):
        return ResourceReport(load=0.25, kind="toy", details={"cpu_percent": 25.0})

    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        selected = tuple(c for c in contacted if c in reports and reports[c].load < 0.5)
        return ResourceDecision(selected, proceed=bool(selected), reason="" if selected else "all busy")


class LoadOutOfRange(Threshold):
    @hookimpl
    def fedplug_measure_resources(self, config):
        report = object.__new__(ResourceReport)  # sidesteps the dataclass's own range check
        object.__setattr__(report, "load", 1.5)
        object.__setattr__(report, "kind", "toy")
        object.__setattr__(report, "details", {})
        return report


class SlowMeasure(Threshold):
    @hookimpl
    def fedplug_measure_resources(self, config):
        time.sleep(2.2)
        return ResourceReport(load=0.2)


class SelectsStrangers(Threshold):
    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        selected = tuple(c for c, r in reports.items() if r.load < 0.5)  # whoever answered
        return ResourceDecision(selected, proceed=bool(selected))


class CrashesOnMissingReport(Threshold):
    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        selected = tuple(c for c in contacted if reports[c].load < 0.5)
        return ResourceDecision(selected, proceed=bool(selected))


class Blocks(Threshold):
    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        time.sleep(0.6)  # e.g. re-measuring, or waiting for late answers, on the event loop
        return Threshold.fedplug_select_clients(self, reports, contacted, config)


class NeverProceeds(Threshold):
    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        return ResourceDecision((), proceed=False, reason="always busy")


class ProceedsWithNobody(Threshold):
    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        decision = Threshold.fedplug_select_clients(self, reports, contacted, config)
        return ResourceDecision(decision.selected, proceed=True)


class ReturnsDict(Threshold):
    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        return {"selected": list(contacted), "proceed": True}


class SelectedNone(Threshold):
    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        return ResourceDecision(None, True, "selected is not a tuple")


POLICIES = {
    "threshold_ok": Threshold,
    "selected_none": SelectedNone,
    "misnamed_file": Threshold,  # correct code; its resource_policy/misnamed_file.yaml says name: threshold
    "load_out_of_range": LoadOutOfRange,
    "slow_measure": SlowMeasure,
    "selects_strangers": SelectsStrangers,
    "crashes_on_missing_report": CrashesOnMissingReport,
    "blocks": Blocks,
    "never_proceeds": NeverProceeds,
    "proceeds_with_nobody": ProceedsWithNobody,
    "returns_dict": ReturnsDict,
}


# ----------------------------------------------------------------- observers

class Logger:
    """Correct: writes one line per round into the run directory."""

    def __init__(self):
        self.path = None

    @hookimpl
    def fedplug_run_start(self, config, run_dir):
        self.path = run_dir / "toy_log.csv"
        self.path.write_text("round,map50\n")

    @hookimpl
    def fedplug_round_end(self, record, global_weights, previous_weights):
        shift = sum(float((global_weights[k].double() - previous_weights[k].double()).norm())
                    for k in global_weights if global_weights[k].is_floating_point())
        map50 = "" if record.map50 is None else f"{record.map50:.4f}"
        with self.path.open("a") as f:
            f.write(f"{record.round_number},{map50},{shift:.4f}\n")

    @hookimpl
    def fedplug_run_end(self, rounds, best_round, reason):
        with self.path.open("a") as f:
            f.write(f"# {reason}, best round {best_round}\n")


class CrashesOnMissingMetric(Logger):
    @hookimpl
    def fedplug_round_end(self, record, global_weights, previous_weights):
        with self.path.open("a") as f:
            f.write(f"{record.round_number},{record.map50:.4f}\n")  # None on rounds without evaluation


class ImplementsRoleHook(Logger):
    @hookimpl
    def fedplug_select_clients(self, reports, contacted, config):
        return ResourceDecision(tuple(contacted), proceed=True)


class WrongArgumentName(Logger):
    @hookimpl
    def fedplug_round_start(self, round_number, clients):  # the spec calls it client_ids
        pass


class MutatesWeights(Logger):
    @hookimpl
    def fedplug_round_end(self, record, global_weights, previous_weights):
        for t in global_weights.values():
            if t.is_floating_point():
                t.clamp_(-1.0, 1.0)  # "tidy up" the model it was only shown


class NeedsARound(Logger):
    @hookimpl
    def fedplug_run_end(self, rounds, best_round, reason):
        with self.path.open("a") as f:
            f.write(f"# last round {rounds[-1].round_number}\n")


class MisspeltHook(Logger):
    @hookimpl
    def fedplug_round_ended(self, record):  # the hook is fedplug_round_end
        pass


OBSERVERS = {
    "logger_ok": Logger,
    "misspelt_hook": MisspeltHook,
    "crashes_on_missing_metric": CrashesOnMissingMetric,
    "implements_role_hook": ImplementsRoleHook,
    "wrong_argument_name": WrongArgumentName,
    "mutates_weights": MutatesWeights,
    "needs_a_round": NeedsARound,
}


# ----------------------------------------------------------------- detectors

class ToyNet(torch.nn.Module):
    """One box and one presence score per class, from pooled conv features."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, num_classes * 5)

    def forward(self, images):
        x = torch.stack(images)
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(x).view(len(images), self.num_classes, 5)


def _targets(target, num_classes, h, w):
    present = torch.zeros(num_classes)
    boxes = torch.zeros(num_classes, 4)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    for box, label in zip(target["boxes"], target["labels"].tolist()):
        present[label - 1] = 1.0
        boxes[label - 1] = box / scale
    return present, boxes


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class ToyDetector:
    """Correct: builds from config["seed"], trains with SGD (+ proximal term), evaluates VOC-style."""

    def make(self, num_classes):
        return ToyNet(num_classes)

    @hookimpl
    def fedplug_build_model(self, config, class_names):
        with torch.random.fork_rng():
            torch.manual_seed(int(config["seed"]))
            return self.make(len(class_names))

    def loss(self, model, batch):
        images = [img for img, _ in batch]
        out = model(images)
        total = 0.0
        for i, (img, target) in enumerate(batch):
            present, boxes = _targets(target, model.num_classes, img.shape[1], img.shape[2])
            total = total + torch.nn.functional.binary_cross_entropy_with_logits(out[i, :, 0], present)
            mask = present.bool()
            if mask.any():
                total = total + ((torch.sigmoid(out[i, mask, 1:]) - boxes[mask]) ** 2).sum()
        return total / len(batch)

    def proximal(self, model, global_weights, mu):
        return mu / 2 * sum(((p - global_weights[n]) ** 2).sum() for n, p in model.named_parameters())

    def check_loss(self, loss):
        return math.isfinite(float(loss))

    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        torch.manual_seed(settings.seed)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
        losses = []
        for _ in range(settings.local_epochs):
            order = list(range(len(dataset)))
            for start in range(0, len(order), settings.batch_size):
                batch = [dataset[i] for i in order[start:start + settings.batch_size]]
                loss = self.loss(model, batch)
                if not self.check_loss(loss):
                    return TrainResult(None, len(dataset), float(loss), ok=False, reason=f"non-finite loss {float(loss)}")
                losses.append(float(loss))
                if settings.proximal_mu:
                    loss = loss + self.proximal(model, global_weights, settings.proximal_mu)
                opt.zero_grad()
                loss.backward()
                opt.step()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return TrainResult(weights, len(dataset), sum(losses) / len(losses))

    def stats(self, model, dataset):
        n = model.num_classes
        stats = DetectionStats.empty(n)
        for img, target in dataset:
            h, w = img.shape[1:]
            out = model([img])[0]
            for c in range(n):
                gts = [b.tolist() for b, l in zip(target["boxes"], target["labels"]) if int(l) == c + 1]
                stats.num_ground_truth[c] += len(gts)
                box = (torch.sigmoid(out[c, 1:]) * torch.tensor([w, h, w, h])).tolist()
                stats.scores[c].append(float(torch.sigmoid(out[c, 0])))
                stats.true_positive[c].append(any(_iou(box, g) >= 0.5 for g in gts))
        return stats

    @hookimpl
    def fedplug_evaluate(self, model, dataset, settings):
        model.eval()
        with torch.no_grad():
            loss = float(self.loss(model, [dataset[i] for i in range(len(dataset))]))
            stats = self.stats(model, dataset)
        tp = sum(sum(t) for t in stats.true_positive)
        gt = sum(stats.num_ground_truth)
        recall = min(1.0, tp / gt) if gt else 0.0
        aps = []
        for c in range(stats.num_classes):
            ranked = sorted(zip(stats.scores[c], stats.true_positive[c]), reverse=True)
            hits, ap = 0, 0.0
            for k, (_, hit) in enumerate(ranked, 1):
                if hit:
                    hits += 1
                    ap += hits / k
            aps.append(ap / stats.num_ground_truth[c] if stats.num_ground_truth[c] else 0.0)
        return EvalResult(len(dataset), loss, min(1.0, sum(aps) / len(aps)), recall, stats)


class DoesNotTrain(ToyDetector):
    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        with torch.no_grad():
            loss = float(self.loss(model, [dataset[i] for i in range(len(dataset))]))
        return TrainResult({k: v.clone() for k, v in global_weights.items()}, len(dataset), loss)


class NanLossOk(ToyDetector):
    def check_loss(self, loss):
        return True  # trains on, and reports the NaN average as a success


class RaisesOnNan(ToyDetector):
    def check_loss(self, loss):
        if not math.isfinite(float(loss)):
            raise FloatingPointError("loss is NaN")
        return True


class IgnoresProximalMu(ToyDetector):
    def proximal(self, model, global_weights, mu):
        return 0.0


class Unseeded(ToyDetector):
    @hookimpl
    def fedplug_build_model(self, config, class_names):
        return self.make(len(class_names))


class FixedClassCount(ToyDetector):
    @hookimpl
    def fedplug_build_model(self, config, class_names):
        with torch.random.fork_rng():
            torch.manual_seed(int(config["seed"]))
            return self.make(2)


class ExtraStateNet(ToyNet):
    def get_extra_state(self):
        return {"anchors": [[10, 13], [16, 30]]}  # a Python object in the state dict

    def set_extra_state(self, state):
        self.anchors = state


class NonTensorState(ToyDetector):
    def make(self, num_classes):
        return ExtraStateNet(num_classes)


class CountsBackground(ToyDetector):
    def stats(self, model, dataset):
        stats = ToyDetector.stats(self, model, dataset)
        return DetectionStats(stats.num_classes + 1, [[]] + stats.scores, [[]] + stats.true_positive,
                              [0] + stats.num_ground_truth)


class TrainsOnGlobalWeights(ToyDetector):
    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        model.load_state_dict(global_weights, assign=True)  # the model now *is* global_weights
        return ToyDetector.fedplug_train_round(self, model, dataset, settings, global_weights, state)


class ReturnsFloat64(ToyDetector):
    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        result = ToyDetector.fedplug_train_round(self, model, dataset, settings, global_weights, state)
        weights = {k: v.double() if v.is_floating_point() else v for k, v in result.weights.items()}
        return TrainResult(weights, result.num_examples, result.train_loss)


class TrainReturnsDict(ToyDetector):
    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        result = ToyDetector.fedplug_train_round(self, model, dataset, settings, global_weights, state)
        return {"weights": result.weights, "num_examples": result.num_examples, "train_loss": result.train_loss}


class EvaluateWithoutMap(ToyDetector):
    @hookimpl
    def fedplug_evaluate(self, model, dataset, settings):
        result = ToyDetector.fedplug_evaluate(self, model, dataset, settings)
        return EvalResult(result.num_examples, result.loss, None, result.recall, result.stats)


DETECTORS = {
    "toy_ok": ToyDetector,
    "train_returns_dict": TrainReturnsDict,
    "evaluate_without_map": EvaluateWithoutMap,
    "no_global_package": ToyDetector,  # correct code; its model/no_global_package.yaml lacks the header
    "does_not_train": DoesNotTrain,
    "nan_loss_ok": NanLossOk,
    "raises_on_nan": RaisesOnNan,
    "ignores_proximal_mu": IgnoresProximalMu,
    "unseeded": Unseeded,
    "fixed_class_count": FixedClassCount,
    "non_tensor_state": NonTensorState,
    "counts_background": CountsBackground,
    "trains_on_global_weights": TrainsOnGlobalWeights,
    "returns_float64": ReturnsFloat64,
}
'''

SUITES = r'''
import pytest
import torch

torch.set_num_threads(1)

import toy_plugins
from fedplug.testing import AggregatorContract, DetectorContract, ObserverContract, ResourcePolicyContract

pytest_plugins = ["fedplug.testing.plugin"]


@pytest.mark.parametrize("aggregator_name", sorted(toy_plugins.AGGREGATORS))
class TestAggregator(AggregatorContract):
    @pytest.fixture
    def aggregator_plugin(self, aggregator_name):
        return toy_plugins.AGGREGATORS[aggregator_name]()

    @pytest.fixture
    def aggregator_config(self, aggregator_name):
        return {"name": aggregator_name}


@pytest.mark.parametrize("resource_policy_name", sorted(toy_plugins.POLICIES))
class TestResourcePolicy(ResourcePolicyContract):
    @pytest.fixture
    def resource_policy_plugin(self, resource_policy_name):
        return toy_plugins.POLICIES[resource_policy_name]()

    @pytest.fixture
    def resource_policy_config(self, resource_policy_name):
        return {"name": resource_policy_name}


@pytest.mark.parametrize("observer_name", sorted(toy_plugins.OBSERVERS))
class TestObserver(ObserverContract):
    @pytest.fixture
    def observer_plugin(self, observer_name):
        return toy_plugins.OBSERVERS[observer_name]()


@pytest.mark.parametrize("detector_name", sorted(toy_plugins.DETECTORS))
class TestDetector(DetectorContract):
    @pytest.fixture
    def detector_plugin(self, detector_name):
        return toy_plugins.DETECTORS[detector_name]()

    @pytest.fixture
    def detector_config(self, detector_name):
        return {"name": detector_name, "seed": 0}
'''

# role -> the inner suite class, its reference plugin, and defect -> the check that must fail.
EXPECTED = {
    "aggregator": ("TestAggregator", "fedavg_ok", {
        "counts_global_as_client": "test_single_update_gives_its_weights",
        "server_weight_decay": "test_unchanged_clients_leave_global_weights_unchanged",
        "geometric_mean": "test_result_is_finite",
        "own_deadline": "test_aggregates_a_lazily_filled_stream",
        "mutates_input": "test_inputs_are_not_mutated",
        "drops_key": "test_names_shapes_dtypes_preserved",
        "changes_dtype": "test_names_shapes_dtypes_preserved",
        "non_deterministic": "test_deterministic",
        "two_pass": "test_consumes_updates_as_one_shot_stream",
        "uses_len": "test_consumes_updates_as_one_shot_stream",
        "first_only": "test_consumes_updates_as_one_shot_stream",
        "silent_on_empty": "test_empty_round_raises_empty_round_error",
        "keeps_updates_in_state": "test_state_holds_only_tensors_numbers_strings",
        "sparse_result": "test_result_survives_wire_format",
        "missing_hook": "test_single_update_gives_its_weights",
        "undecorated": "test_single_update_gives_its_weights",
        "returns_list": "test_single_update_gives_its_weights",
        "misnamed_file": "test_config_file_composes",
    }),
    "resource_policy": ("TestResourcePolicy", "threshold_ok", {
        "load_out_of_range": "test_measure_returns_a_valid_report_quickly",
        "slow_measure": "test_measure_returns_a_valid_report_quickly",
        "selects_strangers": "test_selection_is_a_subset_of_contacted",
        "crashes_on_missing_report": "test_handles_missing_reports",
        "blocks": "test_selection_is_a_subset_of_contacted",
        "never_proceeds": "test_all_idle_clients_can_take_part",
        "proceeds_with_nobody": "test_handles_missing_reports",
        "returns_dict": "test_selection_is_a_subset_of_contacted",
        "selected_none": "test_selection_is_a_subset_of_contacted",
        "misnamed_file": "test_config_file_composes",
    }),
    "observer": ("TestObserver", "logger_ok", {
        "crashes_on_missing_metric": "test_simulated_run_does_not_raise",
        "implements_role_hook": "test_implements_only_observer_hooks",
        "wrong_argument_name": "test_implements_only_observer_hooks",
        "mutates_weights": "test_weights_shown_are_not_modified",
        "needs_a_round": "test_run_that_ends_before_any_round",
        "misspelt_hook": "test_implements_only_observer_hooks",
    }),
    "detector": ("TestDetector", "toy_ok", {
        "does_not_train": "test_train_round_changes_weights",
        "nan_loss_ok": "test_non_finite_loss_is_reported_not_raised",
        "raises_on_nan": "test_non_finite_loss_is_reported_not_raised",
        "ignores_proximal_mu": "test_proximal_mu_is_honoured",
        "unseeded": "test_build_is_deterministic_for_a_seed",
        "fixed_class_count": "test_build_follows_class_count",
        "non_tensor_state": "test_weights_round_trip_exactly",
        "counts_background": "test_evaluate_returns_documented_metrics",
        "trains_on_global_weights": "test_train_round_leaves_global_weights_untouched",
        "returns_float64": "test_train_round_gives_finite_loss",
        "train_returns_dict": "test_train_round_gives_finite_loss",
        "evaluate_without_map": "test_evaluate_returns_documented_metrics",
        "no_global_package": "test_config_file_composes",
    }),
}

# Phrases the failure must contain, where a defect could otherwise fail the check by accident.
EXPECTED_MESSAGE = {
    ("aggregator", "first_only"): "consumed 1 of 3 updates",
    ("aggregator", "changes_dtype"): "dtype",
    ("resource_policy", "load_out_of_range"): "within [0, 1]",
    ("resource_policy", "slow_measure"): "the limit is",
    ("resource_policy", "blocks"): "must return within",
    ("resource_policy", "selects_strangers"): "not contacted",
    ("resource_policy", "proceeds_with_nobody"): "proceed=True with no client selected",
    ("resource_policy", "returns_dict"): "not a ResourceDecision",
    ("observer", "wrong_argument_name"): "clients",
    ("detector", "ignores_proximal_mu"): "proximal term is ignored",
    ("detector", "nan_loss_ok"): "returned ok=True",
    ("detector", "raises_on_nan"): "raised FloatingPointError",
    ("detector", "returns_float64"): "dtype",
    # checked when the plugin is registered, with the message activate() gives a run
    ("aggregator", "missing_hook"): "does not implement fedplug_aggregate",
    ("aggregator", "undecorated"): "has a function fedplug_aggregate but it is not marked @hookimpl",
    ("observer", "implements_role_hook"): "plugins.disable=[implements_role_hook]",
    ("observer", "misspelt_hook"): "Did you mean 'fedplug_round_end'?",
    # wrong return types fail with a message, not a TypeError inside the suite
    ("aggregator", "returns_list"): "must be a dict of tensors, got list",
    ("resource_policy", "selected_none"): "must be a tuple of client ids",
    ("detector", "train_returns_dict"): "must return a fedplug.types.TrainResult",
    ("detector", "evaluate_without_map"): "EvalResult.map50 is None",
    # config files, composed into fedplug's config as a run composes them
    ("aggregator", "misnamed_file"): "Set name: misnamed_file",
    ("resource_policy", "misnamed_file"): "Set name: misnamed_file",
    ("detector", "no_global_package"): "# @package _global_",
}

# Defects whose every failing check must fail cleanly: no TypeError/AttributeError from inside the suite.
WRONG_RETURN_TYPES = [("aggregator", "returns_list"), ("resource_policy", "selected_none"),
                      ("detector", "train_returns_dict"), ("detector", "evaluate_without_map")]

# A config package with the toy plugins' YAML files, declared by a fake distribution in the
# inner session's directory (on its sys.path): found through the fedplug.conf entry point.
TOY_CONFIGS = {
    "aggregator/fedavg_ok.yaml": "name: fedavg_ok\n",
    "aggregator/misnamed_file.yaml": "name: misnamed\n",
    "resource_policy/threshold_ok.yaml": "name: threshold_ok\nthreshold: 0.5\n",
    "resource_policy/misnamed_file.yaml": "name: threshold\n",
    "model/toy_ok.yaml": "# @package _global_\nmodel:\n  name: toy_ok\n  seed: ${run.seed}\n",
    "model/no_global_package.yaml": "model:\n  name: no_global_package\n  seed: ${run.seed}\n",
}


def _write_toy_config_package(root) -> None:
    package = root / "toy_conf"
    for rel, text in TOY_CONFIGS.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    (package / "__init__.py").touch()
    info = root / "fedplug_toy_conf-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedplug-toy-conf\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedplug.conf]\ntoy = toy_conf\n")

_outcomes: dict[str, dict[tuple[str, str], tuple[str, str]]] = {}


def _role_outcomes(pytester: pytest.Pytester, role: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(check name, plugin) -> (outcome, failure text) for one role's suite.

    One inner session runs every role's suite over every toy plugin, once per
    outer session, in a subprocess: torch registers native operators when its
    submodules are first imported, which an in-process run (whose sys.modules is
    restored afterwards) would repeat and break.
    """
    if not _outcomes:
        pytester.makepyfile(toy_plugins=TOY_PLUGINS, test_inner=SUITES)
        _write_toy_config_package(pytester.path)
        report = pytester.path / "report.xml"
        run = pytester.runpytest_subprocess(
            "test_inner.py", "-p", "no:cacheprovider", f"--junitxml={report}", "-q", timeout=600
        )
        assert report.exists(), f"the inner session wrote no report:\n{run.stdout.str()[-3000:]}"
        roles_by_class = {cls: r for r, (cls, _, _) in EXPECTED.items()}
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            cls = case.get("classname", "").rsplit(".", 1)[-1]
            name, _, param = case.get("name", "").partition("[")
            outcome, text = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                    text += f"{child.get('message', '')}\n{child.text or ''}"
                elif child.tag == "skipped" and outcome == "passed":
                    outcome = "skipped"
            _outcomes.setdefault(roles_by_class[cls], {})[(name, param.rstrip("]"))] = (outcome, text)
    assert _outcomes.get(role), f"the inner session ran no {role} check"
    return _outcomes[role]


@pytest.mark.parametrize("role", sorted(EXPECTED))
def test_correct_plugin_passes_every_check(pytester, role):
    _, reference, _ = EXPECTED[role]
    results = _role_outcomes(pytester, role)
    mine = {name: outcome for (name, plugin), outcome in results.items() if plugin == reference}
    assert mine, f"no check ran for {reference}"
    failed = {name: text for name, (outcome, text) in mine.items() if outcome != "passed"}
    assert not failed, f"the correct {role} {reference} failed: " + "\n".join(
        f"{n}:\n{t[-1500:]}" for n, t in failed.items()
    )


@pytest.mark.parametrize(
    "role, defect",
    [(role, defect) for role, (_, _, defects) in sorted(EXPECTED.items()) for defect in sorted(defects)],
)
def test_broken_plugin_fails_its_check(pytester, role, defect):
    _, _, defects = EXPECTED[role]
    check = defects[defect]
    results = _role_outcomes(pytester, role)
    assert (check, defect) in results, f"{check} did not run for {defect}"
    outcome, text = results[(check, defect)]
    assert outcome == "failed", f"{check} did not catch the defect of {role} {defect!r} ({outcome})"
    phrase = EXPECTED_MESSAGE.get((role, defect))
    if phrase:
        assert phrase in text, f"{check} failed for {defect!r}, but not with {phrase!r}:\n{text[-2000:]}"


def test_every_check_is_exercised_by_some_defect(pytester):
    """A check no broken plugin ever fails could be vacuous: each must catch at least one defect."""
    uncaught = []
    for role, (_, _, defects) in sorted(EXPECTED.items()):
        results = _role_outcomes(pytester, role)
        checks = {name for name, _ in results}
        failing = {name for (name, plugin), (outcome, _) in results.items() if outcome == "failed" and plugin in defects}
        uncaught += [f"{role}: {name}" for name in sorted(checks - failing)]
    assert uncaught == [], "checks no defect makes fail: " + ", ".join(uncaught)


def test_suite_without_a_name_says_how_to_parametrize(pytester):
    pytester.makepyfile(
        test_unnamed=textwrap.dedent(
            """
            from fedplug.testing import AggregatorContract
            pytest_plugins = ["fedplug.testing.plugin"]

            class TestForgotName(AggregatorContract):
                pass
            """
        )
    )
    result = pytester.runpytest("-k", "test_deterministic", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*parametrize the suite with your plugin's name*aggregator_name*"])


@pytest.mark.parametrize("role, defect", WRONG_RETURN_TYPES)
def test_wrong_return_types_fail_with_a_message_not_an_exception_inside_the_suite(pytester, role, defect):
    results = _role_outcomes(pytester, role)
    failures = {name: text for (name, plugin), (outcome, text) in results.items()
                if plugin == defect and outcome == "failed"}
    assert failures, f"no check failed for {role} {defect!r}"
    for name, text in failures.items():
        for error in ("TypeError", "AttributeError", "KeyError"):
            assert error not in text, f"{name} failed for {defect!r} with a {error} inside the suite:\n{text[-2000:]}"


def test_suite_assertions_are_rewritten_by_pytest(pytester):
    # fedplug.testing registers its modules for assertion rewriting: a failing check shows the
    # values of its expression (pytest's "where ..." lines), not only its message.
    _, text = _role_outcomes(pytester, "aggregator")[("test_consumes_updates_as_one_shot_stream", "first_only")]
    assert "where False = " in text and ".exhausted" in text, text[-2000:]


def test_every_testing_module_is_registered_for_rewriting():
    from pathlib import Path

    import fedplug.testing

    source = Path(fedplug.testing.__file__).read_text()
    for module in Path(fedplug.testing.__file__).parent.glob("*.py"):
        if module.stem != "__init__":
            assert f'"{module.stem}"' in source, f"fedplug.testing.{module.stem} is not registered for rewriting"


# The new defects of the hook contract, installed as a package would be (fake entry points):
# activate() refuses each with the message a run prints.
ACTIVATION_DEFECTS = [
    ("aggregator", "missing_hook", "MissingHook",
     ["aggregator 'missing_hook'", "fedplug-toys", "does not implement fedplug_aggregate", "@fedplug.hooks.hookimpl"]),
    ("aggregator", "undecorated", "Undecorated",
     ["aggregator 'undecorated'", "fedplug-toys", "has a function fedplug_aggregate but it is not marked @hookimpl"]),
    ("observer", "implements_role_hook", "ImplementsRoleHook",
     ["observer 'implements_role_hook'", "fedplug-toys", "fedplug_select_clients",
      "plugins.disable=[implements_role_hook]"]),
    ("observer", "misspelt_hook", "MisspeltHook",
     ["observer 'misspelt_hook'", "fedplug-toys", "toy_plugins_meta:misspelt_hook", "fedplug_round_ended",
      "Did you mean 'fedplug_round_end'?", "plugins.disable=[misspelt_hook]"]),
    ("observer", "wrong_argument_name", "WrongArgumentName",
     ["observer 'wrong_argument_name'", "'clients'", "Did you mean 'client_ids'?"]),
]


@pytest.mark.parametrize("role, name, cls, phrases", ACTIVATION_DEFECTS, ids=[d[1] for d in ACTIVATION_DEFECTS])
def test_new_defects_are_refused_at_activate(monkeypatch, tmp_path, role, name, cls, phrases):
    import sys
    from importlib import metadata

    from fedplug import plugins

    (tmp_path / "toy_plugins_meta.py").write_text(TOY_PLUGINS + f"\n{name} = {cls}()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = plugins.ROLE_GROUPS[role]
    ep = metadata.EntryPoint(name, f"toy_plugins_meta:{name}", group)
    real = plugins._entry_points
    monkeypatch.setattr(plugins, "_entry_points",
                        lambda g: real(g) + ([(ep, "fedplug-toys", "0.1")] if g == group else []))
    selection = {"aggregator": name} if role == "aggregator" else {"aggregator": "fedavg"}
    try:
        with pytest.raises(plugins.PluginError) as info:
            plugins.activate(selection, observers=(role == "observer"))
    finally:
        sys.modules.pop("toy_plugins_meta", None)
    for phrase in phrases:
        assert phrase in str(info.value), f"{phrase!r} is missing from:\n{info.value}"
