/* A write command's lifetime: the routes parse and validate a request into a command,
 * hand it to the batcher, and answer it when the batcher reports its outcome. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cmd.h"
#include "command.h"

/* Idempotency-Key: 1-255 printable ASCII characters. */
static bool valid_idem_key(const char *k)
{
	size_t n = 0;

	for (; k[n]; n++)
		if (k[n] < 0x20 || k[n] > 0x7e || n >= 255)
			return false;
	return n > 0;
}

/* If-Match: "<version>" (the quotes optional); false when malformed. */
static bool parse_if_match(const char *h, int32_t *out)
{
	char *end;
	long v;
	size_t n = strlen(h);

	if (n >= 2 && h[0] == '"' && h[n - 1] == '"') {
		h++;
		n -= 2;
	}
	if (n == 0 || n > 10 || h[0] < '0' || h[0] > '9')
		return false;
	v = strtol(h, &end, 10);
	if ((size_t)(end - h) != n || v < 0 || v > INT32_MAX)
		return false;
	*out = (int32_t)v;
	return true;
}

/* Fingerprint of what makes two keyed requests "the same": method, path and the
 * canonical form of the body (key order and whitespace do not matter). */
static bool fingerprint(struct http_request *req, json_t *body, char out[65])
{
	unsigned char digest[DIGEST_SHA256_LEN];
	char *canon = body ? json_dumps(body, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
	const void *parts[3] = { http_method(req), http_path(req), canon ? canon : "" };
	size_t lens[3] = { strlen(http_method(req)) + 1, strlen(http_path(req)) + 1,
			   canon ? strlen(canon) : 0 };
	bool ok = (!body || canon) && digest_sha256_parts(3, parts, lens, digest);

	digest_hex(digest, DIGEST_SHA256_LEN, out);
	free(canon);
	return ok;
}

/* Now in ISO 8601 UTC to the microsecond ("2026-01-02T03:04:05.678901Z"): the seconds
 * formatted once a second, the microseconds by hand. */
static void now_iso(struct command_ctx *ctx, char out[32])
{
	struct timespec ts;
	unsigned us;
	size_t n;

	clock_gettime(CLOCK_REALTIME, &ts);
	if ((long long)ts.tv_sec != ctx->time_at) {
		struct tm tm;
		gmtime_r(&ts.tv_sec, &tm);
		if (strftime(ctx->time_second, sizeof(ctx->time_second), "%Y-%m-%dT%H:%M:%S",
			     &tm) == 0)
			ctx->time_second[0] = '\0';
		ctx->time_at = (long long)ts.tv_sec;
	}
	us = (unsigned)(ts.tv_nsec / 1000) % 1000000;
	n = strlen(ctx->time_second);
	memcpy(out, ctx->time_second, n);
	out[n++] = '.';
	for (int i = 5; i >= 0; i--, us /= 10)
		out[n + (size_t)i] = (char)('0' + us % 10);
	n += 6;
	out[n++] = 'Z';
	out[n] = '\0';
}

/* A zeroed command: an answered one kept by ctx (with its text buffer), else a new one.
 * Commands are made and freed a batch at a time, more than malloc's per-thread cache
 * holds of one size, so each calloc and free took malloc's slower paths. */
static struct cmd *cmd_alloc(struct command_ctx *ctx)
{
	struct cmd *cmd = ctx->spare_cmds;
	struct ledger_event_buf plain;

	if (!cmd)
		return calloc(1, sizeof(*cmd));
	ctx->spare_cmds = cmd->next;
	ctx->nspare_cmds--;
	plain = cmd->plain;
	memset(cmd, 0, sizeof(*cmd));
	cmd->plain = plain;
	return cmd;
}

/* The parts every command shares: headers, body, path account. NULL after replying. */
static struct cmd *cmd_new(struct command_ctx *ctx, struct http_request *req, enum cmd_kind kind,
			   bool account_scoped)
{
	struct cmd *cmd = cmd_alloc(ctx);
	const char *key = http_header(req, "Idempotency-Key");
	const char *if_match = http_header(req, "If-Match");
	const char *text, *id = http_request_id(req);
	size_t len;

	if (!cmd) {
		http_reply_problem(req, 503, "unavailable", "Service unavailable", "out of memory");
		return NULL;
	}
	cmd->ctx = ctx;
	cmd->req = req;
	cmd->kind = kind;
	cmd->expected_version = -1;
	cmd->token_id = http_token(req)->id;
	len = strnlen(id, sizeof(cmd->request_id) - 1);
	memcpy(cmd->request_id, id, len);
	cmd->request_id[len] = '\0';
	now_iso(ctx, cmd->time);
	if (key && !valid_idem_key(key)) {
		http_reply_invalid(req,
				   "header 'Idempotency-Key' must be 1-255 printable ASCII characters");
		goto fail;
	}
	if (key)
		strcpy(cmd->idem_key, key);
	if (if_match && !account_scoped) {
		http_reply_invalid(req,
				   "header 'If-Match' applies only to an existing account's commands");
		goto fail;
	}
	if (if_match && !parse_if_match(if_match, &cmd->expected_version)) {
		http_reply_invalid(req, "header 'If-Match' must be a quoted version, e.g. \"3\"");
		goto fail;
	}
	if (account_scoped) {
		if (!ledger_valid_id(http_param(req, 0))) {
			http_reply_invalid(
				req,
				"the account id in the path must be 1-64 characters of [A-Za-z0-9._:-]");
			goto fail;
		}
		strcpy(cmd->account, http_param(req, 0));
	}
	if (!http_body_checked(req, kind == CMD_CLOSE, &text, &len))
		goto fail;
	/* The usual transfer is read without jansson; the fingerprint of a keyed one
	 * needs the JSON's canonical form. */
	if (kind == CMD_TRANSFER && !key &&
	    ledger_transfer_from_text(text, len, &cmd->plain, &cmd->u.transfer)) {
		cmd->parsed = true;
		return cmd;
	}
	if (!http_body_parse(req, text, len, &cmd->body))
		goto fail;
	return cmd;
fail:
	cmd_free(cmd);
	return NULL;
}

static bool parse_body(struct cmd *cmd, char *err, size_t errlen)
{
	if (cmd->parsed)
		return true;
	switch (cmd->kind) {
	case CMD_OPEN:
		return ledger_parse_open(cmd->body, &cmd->u.open, err, errlen);
	case CMD_DEPOSIT:
	case CMD_WITHDRAW:
		return ledger_parse_money(cmd->body, &cmd->u.money, err, errlen);
	case CMD_TRANSFER:
		return ledger_parse_transfer(cmd->body, &cmd->u.transfer, err, errlen);
	case CMD_CLOSE:
		return ledger_parse_close(cmd->body, err, errlen);
	}
	return false;
}

static void handle(struct http_request *req, void *arg, enum cmd_kind kind, bool account_scoped)
{
	struct command_ctx *ctx = arg;
	struct cmd *cmd = cmd_new(ctx, req, kind, account_scoped);
	char err[256];

	if (!cmd)
		return;
	if (!parse_body(cmd, err, sizeof(err))) {
		http_reply_invalid(req, err);
		cmd_free(cmd);
		return;
	}
	if (cmd->idem_key[0] && !fingerprint(req, cmd->body, cmd->idem_hash)) {
		http_reply_problem(req, 500, "internal", "Internal error",
				   "cannot fingerprint the request (out of memory)");
		cmd_free(cmd);
		return;
	}
	batcher_submit(ctx->batcher, cmd);
}

static void open_account(struct http_request *req, void *arg)
{
	handle(req, arg, CMD_OPEN, false);
}

static void deposit(struct http_request *req, void *arg)
{
	handle(req, arg, CMD_DEPOSIT, true);
}

static void withdraw(struct http_request *req, void *arg)
{
	handle(req, arg, CMD_WITHDRAW, true);
}

static void transfer(struct http_request *req, void *arg)
{
	handle(req, arg, CMD_TRANSFER, false);
}

static void close_account(struct http_request *req, void *arg)
{
	handle(req, arg, CMD_CLOSE, true);
}

const struct http_route command_routes[] = {
	{ "POST", "/accounts", "/accounts", SCOPE_WRITE, open_account, "" },
	{ "POST", "/accounts/*/deposits", "/accounts/{id}/deposits", SCOPE_WRITE, deposit, "" },
	{ "POST", "/accounts/*/withdrawals", "/accounts/{id}/withdrawals", SCOPE_WRITE, withdraw,
	  "" },
	{ "POST", "/accounts/*/close", "/accounts/{id}/close", SCOPE_WRITE, close_account, "" },
	{ "POST", "/transfers", "/transfers", SCOPE_WRITE, transfer, "" },
};
const size_t command_nroutes = sizeof(command_routes) / sizeof(command_routes[0]);

void cmd_free(struct cmd *cmd)
{
	struct command_ctx *ctx;

	if (!cmd)
		return;
	ctx = cmd->ctx;
	json_decref(cmd->body);
	cmd->body = NULL;
	if (!ctx || ctx->nspare_cmds >= CMD_SPARE_MAX) {
		ledger_event_buf_free(&cmd->plain);
		free(cmd);
		return;
	}
	/* Kept with its text buffer, unless that grew past a usual body's size. */
	if (cmd->plain.cap > CMD_SPARE_TEXT_MAX || cmd->plain.json)
		ledger_event_buf_free(&cmd->plain);
	cmd->next = ctx->spare_cmds;
	ctx->spare_cmds = cmd;
	ctx->nspare_cmds++;
}

void cmd_spares_free(struct command_ctx *ctx)
{
	while (ctx->spare_cmds) {
		struct cmd *cmd = ctx->spare_cmds;
		ctx->spare_cmds = cmd->next;
		ledger_event_buf_free(&cmd->plain);
		free(cmd);
	}
	ctx->nspare_cmds = 0;
}

void cmd_drop(void *arg, struct cmd *cmd)
{
	(void)arg;
	cmd_free(cmd);
}

void cmd_settle(void *arg, struct cmd *cmd, struct cmd_outcome *out)
{
	struct http_request *req = cmd->req;
	const char *name;
	json_t *value;

	(void)arg;
	if (out->text) {
		if (out->etag)
			http_set_header(req, "ETag", out->etag);
		if (out->location)
			http_set_header(req, "Location", out->location);
		http_reply_raw(req, out->status, "application/json", out->text, out->text_len);
		cmd_free(cmd);
		return;
	}
	json_object_foreach (out->headers, name, value)
		if (json_is_string(value))
			http_set_header(req, name, json_string_value(value));
	json_decref(out->headers);
	if (out->replay)
		http_set_header(req, "Idempotent-Replayed", "true");
	if (out->status == 503)
		http_set_header(req, "Retry-After", "1");
	if (out->status >= 400) {
		char *text = json_dumps(out->body, JSON_COMPACT);
		http_reply_raw(req, out->status, "application/problem+json", text ? text : "{}",
			       text ? strlen(text) : 2);
		free(text);
		json_decref(out->body);
	} else {
		http_reply_json(req, out->status, out->body);
	}
	out->body = out->headers = NULL;
	cmd_free(cmd);
}
