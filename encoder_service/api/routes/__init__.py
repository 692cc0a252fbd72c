"""The routers, one per resource. Each carries its full path prefix (``/v1/...``): a matched
route's ``path`` is then the template metrics are labelled with, and requests are matched
without an extra level of router nesting."""

from encoder_service.api.routes import admin, embeddings, health, versions

ROUTERS = (embeddings.router, versions.router, admin.router, health.router)
