from . import test_access_rights, test_account_connection, test_app_registration, test_browser_flow, test_callback, test_migration, test_secrets_stay_secret, test_security, test_setup_flow
