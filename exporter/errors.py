"""The project's exceptions. Each edge maps its library's errors into one of these, once.

    ExporterError            anything the CLI turns into one clear line and a non-zero exit
    ├── ConfigError          a bad flag, config file or SLO manifest
    ├── CaptureError         the kernel edge: privileges, BCC, headers, interface, socket
    ├── QueryError           Prometheus answered with an error, timed out or was unreachable
    └── PushError            the Reliably endpoint refused or could not be reached
"""


class ExporterError(Exception):
    """Base of every error the exporter reports to its user."""


class ConfigError(ExporterError):
    """A bad flag, config file or SLO manifest."""


class CaptureError(ExporterError):
    """The capture edge could not start or keep running."""


class QueryError(ExporterError):
    """A Prometheus query failed."""


class PushError(ExporterError):
    """Pushing to the Reliably endpoint failed."""
