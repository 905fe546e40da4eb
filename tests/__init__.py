from . import test_app_registration, test_account_connection, test_callback
