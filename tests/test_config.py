"""Typed config: YAML + dotted overrides, errors that name the key, round trip through to_dict."""

import dataclasses

import pytest

from xr_jax import config as C

ROOT_YAML = "configs/tiny_sft.yaml"


def test_yaml_plus_overrides_are_typed_and_round_trip():
    cfg = C.load(ROOT_YAML, ["optim.lr=2e-5", "mesh.shape=[2,2,2]", "checkpoint.dir=/tmp/x", "train.peak_flops=1e12",
                             "model.vocab_size=null"])
    assert cfg.optim.lr == 2e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.mesh.shape == (2, 2, 2) and cfg.checkpoint.dir == "/tmp/x" and cfg.train.peak_flops == 1e12
    assert cfg.train.seq_len == 64 and cfg.optim.schedule == "cosine"  # from the file
    assert C.from_dict(C.Config, C.to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1e-4", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("trian.steps=3", "unknown config key 'trian' (did you mean 'train'?)"),
    ("train.steps=ten", "config key 'train.steps' has value 'ten' (str); expected int"),
    ("train.freeze_vision=3", "config key 'train.freeze_vision' has value 3 (int); expected bool"),
    ("mesh.shape=[2,x,1]", "config key 'mesh.shape[1]' has value 'x' (str); expected int"),
    ("optim.schedule=exp", "config key 'optim.schedule' is 'exp'; expected one of step_decay, cosine, linear, constant"),
    ("train.batch_size=6", "train.batch_size 6 is not divisible by train.microbatches 4"),
    ("optim", "override 'optim' must look like key.sub=value"),
    ("model.remat=some", "config key 'model.remat' is 'some'; expected one of none, full, dots"),
    ("grpo.old_logprobs=x", "config key 'grpo.old_logprobs' is 'x'; expected one of sampler, recompute"),
    ("grpo.advantage=ppo",
     "config key 'grpo.advantage' is 'ppo'; expected one of dr_grpo, grpo, rloo (the registered advantage estimators)"),
    ("grpo.loss_agg=mean", "config key 'grpo.loss_agg' is 'mean'; expected one of dr-grpo, seq-mean-token-mean, "
                           "token-mean (the registered loss aggregations)"),
    ("grpo.kl_type=k4", "config key 'grpo.kl_type' is 'k4'; expected one of k1, k2, k3 (the registered KL estimators)"),
    ("grpo.reward=math", "config key 'grpo.reward' was replaced; write grpo.rewards: [{name: <reward>, weight: 1.0}]"),
    ("grpo.format_weight=0.1", "config key 'grpo.format_weight' was replaced; write grpo.rewards: "),
    ("grpo.rewards=[{weight: 1}]", "config key 'grpo.rewards[0]' needs 'name'"),
    ("grpo.rewards=[{name: math}, {name: math, weight: 2}]", "config key 'grpo.rewards' names a reward twice"),
    ("grpo.rewards=[]", "config key 'grpo.rewards' is empty"),
    ("grpo.rewards=[{name: math, weight: .inf}]", "config key 'grpo.rewards[0].weight' must be a finite number"),
])
def test_bad_keys_and_values_fail_naming_the_key(override, message):
    with pytest.raises(C.ConfigError) as e:
        C.load(ROOT_YAML, ["train.microbatches=4", override])
    assert message in str(e.value)


def test_a_new_section_needs_no_change_to_the_mechanism():
    @dataclasses.dataclass(frozen=True)
    class DistillSection:
        teacher: str = "big"
        alpha: float = 0.5

    @dataclasses.dataclass(frozen=True)
    class WithDistill(C.Config):
        distill: DistillSection = DistillSection()

    cfg = C.load(ROOT_YAML, ["distill.alpha=0.25"], cls=WithDistill)
    assert cfg.distill.alpha == 0.25 and cfg.train.steps == 20
    assert C.to_dict(cfg)["distill"] == {"teacher": "big", "alpha": 0.25}
    with pytest.raises(C.ConfigError, match="distill.alpah"):
        C.load(None, ["train.steps=1", "distill.alpah=0.3"], cls=WithDistill)


def test_rewards_are_a_weighted_list_that_round_trips():
    cfg = C.load(ROOT_YAML, ["grpo.rewards=[{name: math}, {name: format, weight: 0.25}]", "grpo.advantage=rloo"])
    assert cfg.grpo.rewards == (C.RewardTerm("math", 1.0), C.RewardTerm("format", 0.25))
    assert C.to_dict(cfg)["grpo"]["rewards"] == [{"name": "math", "weight": 1.0}, {"name": "format", "weight": 0.25}]
    assert C.from_dict(C.Config, C.to_dict(cfg)) == cfg and cfg.grpo.advantage == "rloo"


def test_a_registered_name_becomes_a_valid_value():
    """A setting annotated with a registry accepts exactly what is registered, when the config is loaded."""
    import typing

    from xr_jax.registry import Registry

    widgets = Registry("widget")
    widgets.register("cog")(len)

    @dataclasses.dataclass(frozen=True)
    class Section:
        widget: typing.Annotated[str, widgets] = "cog"

    with pytest.raises(C.ConfigError, match="'widget' is 'gear'; expected one of cog \\(the registered widgets\\)"):
        C.from_dict(Section, {"widget": "gear"})
    widgets.register("gear")(abs)
    assert C.from_dict(Section, {"widget": "gear"}).widget == "gear"
    with pytest.raises(ValueError, match="widget 'cog' is already registered to builtins.len"):
        widgets.register("cog")(abs)


def test_steps_or_epochs_must_be_given():
    with pytest.raises(C.ConfigError, match=r"set train.epochs \(passes over the data\) or train.steps"):
        C.load(None, [])
    assert C.load(None, ["train.epochs=3", "train.steps_per_epoch=7"]).total_steps == 21
    assert C.load(None, ["train.epochs=3"]).total_steps is None  # counted from the data at start
    with pytest.raises(C.ConfigError, match="'train.epochs' must be >= 1"):
        C.load(None, ["train.epochs=0"])


def test_overflow_is_a_checked_literal():
    assert C.load(None, ["train.steps=1"]).data.overflow == "truncate"
    assert C.load(None, ["train.steps=1", "data.overflow=chunk"]).data.overflow == "chunk"
    with pytest.raises(C.ConfigError, match="'data.overflow' is 'cut'; expected one of truncate, drop, chunk"):
        C.load(None, ["train.steps=1", "data.overflow=cut"])
