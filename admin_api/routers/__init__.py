"""One APIRouter per concern; ``main.create_app`` includes them."""
