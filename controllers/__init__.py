from . import main
from . import signin
