"""The run configuration: composing it and checking it before anything is built, each in one place.

- :mod:`src.config.compose`: conf/ and its groups, the resolvers, ``compose(overrides)`` outside a Hydra app;
- :mod:`src.config.keys`: every key and value type against the constructor that receives it;
- :mod:`src.config.rules`: rules between fields (crops vs image size, devices, batch vs samples, objectives,
  and each method's and backbone's own ``config_problems``); ``check_config`` runs keys + rules;
- :mod:`src.config.command_line`: the command line before Hydra runs (unknown choices, sweeps expanded, optional
  plugins, Hydra's own flags left alone) and the arguments ``resume=auto`` and multi-node runs add.

This floor sits above data, backbones and methods (it reads their constants and their rules) and below the
commands; nothing under it imports it except the commands, callbacks that compose configs, and tests.
"""
