"""One APIRouter per resource; `service.app` composes them."""
