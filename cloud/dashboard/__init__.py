"""The dashboard page served by the cloud API (``/dashboard/``) and the endpoints it polls."""

from cloud.dashboard.router import ThroughputSampler, dashboard_router, fleet_health

__all__ = ["ThroughputSampler", "dashboard_router", "fleet_health"]
