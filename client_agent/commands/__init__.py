"""``fedseg train``, ``fedseg evaluate`` and ``fedseg segment``: one module per command.

Each module has the interface every ``fedseg`` command module has (``fedseg.cli``):
``add_arguments(parser)`` and ``run(args) -> int``. The work is done by
``client_agent.centralized`` (training) and ``client_agent.inference`` (scoring, segmentation).
"""
