"""The package's Hydra config composes with fedplug's, through the search path fedplug builds."""

from hydra import compose, initialize_config_module

from fedplug.testing.loading import config_packages


def test_conf_package_is_declared():
    assert "fedplug_example.conf" in config_packages()


def test_aggregator_group_composes_with_overrides():
    with initialize_config_module(config_module="fedplug.conf", version_base=None):
        cfg = compose(
            config_name="config",
            overrides=["hydra.searchpath=[pkg://fedplug_example.conf]", "aggregator=fedavg_clipped",
                       "aggregator.max_norm=2.5"],
        )
    assert cfg.aggregator.name == "fedavg_clipped"
    assert cfg.aggregator.max_norm == 2.5
    assert cfg.aggregator.server_lr == 1.0
