"""The ``tomodose`` command line. Each subcommand lives in its own module here and exposes
``register(subparsers)``; :mod:`tomodose.cli.main` discovers them from :data:`SUBCOMMANDS`."""

#: Subcommand modules, in the order ``--help`` lists them. Missing modules are skipped.
SUBCOMMANDS = ("phantom", "demo", "dose", "dvh", "gamma", "benchmark", "batch", "dicom")
