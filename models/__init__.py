from . import microsoft365_vault
from . import microsoft365_app
from . import microsoft365_account
from . import microsoft365_authorization
from . import microsoft365_server_mixin
from . import fetchmail_server
from . import ir_mail_server
from . import res_config_settings
