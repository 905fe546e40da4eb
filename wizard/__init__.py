from . import microsoft365_connect_wizard
