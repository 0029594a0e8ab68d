"""edged: a resource daemon for Linux edge machines.

Senses memory, CPU, GPU, power and thermal sensors, reports them as OpenTelemetry metrics,
keeps co-located processes inside configured limits and serves resource budgets to clients.
"""

__version__ = "0.1.0"
