-- A duplicated (neutralized) database must not read or send the production mailboxes.
UPDATE microsoft365_account
   SET token_cache_sealed = NULL, home_account_id = NULL, status = 'not_connected',
       token_expires_at = NULL, last_error = NULL
 WHERE status != 'app_only';
UPDATE microsoft365_app SET app_token_cache_sealed = NULL, app_token_expires_at = NULL;
DELETE FROM microsoft365_authorization;
DELETE FROM microsoft365_admin_consent;
UPDATE res_users SET microsoft365_signin_ticket = NULL WHERE microsoft365_signin_ticket IS NOT NULL;
