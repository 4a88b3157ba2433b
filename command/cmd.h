/* A write command's lifetime: parsed from its HTTP request, decided by the batcher,
 * answered (and freed) here when the batcher reports its outcome. */
#ifndef DAYBOOK_CMD_H
#define DAYBOOK_CMD_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "digest.h"
#include "http.h"
#include "ledger.h"
#include "ledger_json.h"

struct command_ctx;

enum cmd_kind { CMD_OPEN, CMD_DEPOSIT, CMD_WITHDRAW, CMD_TRANSFER, CMD_CLOSE };

/* One write request on its way through the batcher. Strings in `u` borrow from
 * `body`, or from `plain` when the body was read without jansson (a plain transfer
 * without an Idempotency-Key; body NULL then), both the command's. Only this module
 * touches `req`: the batcher reads the parsed fields and reports an outcome (struct
 * cmd_outcome). */
struct cmd {
	struct cmd *next;
	struct command_ctx *ctx; /* keeps the command for reuse once it is freed */
	struct http_request *req;
	enum cmd_kind kind;
	json_t *body; /* NULL for an empty close body, and when read as `plain` */
	struct ledger_event_buf plain;
	bool parsed; /* `u` was read from the text (ledger_transfer_from_text) */
	union {
		struct ledger_open_body open;
		struct ledger_money_body money;
		struct ledger_transfer_body transfer;
	} u;
	char account[LEDGER_ID_MAX + 1]; /* the account a path names */
	int32_t expected_version;        /* If-Match, -1 when absent */
	const char *token_id;
	char request_id[129];
	char idem_key[256]; /* "" when the request has none */
	char idem_hash[DIGEST_SHA256_HEX_LEN + 1];
	char time[32]; /* ISO 8601 UTC, for event metadata */
	int attempts;  /* write attempts after conflicts */
	bool solo;     /* retry alone after a batch conflict */
};

/* What became of a command: its status, its JSON body (a problem document when
 * status >= 400) and the headers to send with it ({"ETag": ..., "Location": ...}). */
struct cmd_outcome {
	int status;
	json_t *body;    /* owned; stolen by cmd_settle */
	json_t *headers; /* owned, may be NULL; stolen by cmd_settle */
	bool replay;     /* answered from a stored idempotency record */
	/* Or a success answered from text (body and headers NULL): the JSON body and
	 * the ETag and Location headers (NULL when absent), valid during the call. */
	const char *text;
	size_t text_len;
	const char *etag, *location;
};

/* Answer cmd's request with its outcome and free cmd; steals out->body and
 * out->headers. The signature of struct batcher_hooks' settle (arg is unused). */
void cmd_settle(void *arg, struct cmd *cmd, struct cmd_outcome *out);
/* Free a command (and its body) without answering it. */
void cmd_drop(void *arg, struct cmd *cmd);
/* Free a command: kept by its context for the next request (up to CMD_SPARE_MAX). */
void cmd_free(struct cmd *cmd);
/* Free the commands the context keeps for reuse (at the service's end). */
void cmd_spares_free(struct command_ctx *ctx);
/* How many answered commands a context keeps for reuse, and the largest body text
 * buffer one keeps with it. */
#define CMD_SPARE_MAX 256
#define CMD_SPARE_TEXT_MAX 1024

/* The HTTP routes of the write API: each parses its request into a command and
 * submits it to the batcher of the struct command_ctx given as the routes' arg. */
extern const struct http_route command_routes[];
extern const size_t command_nroutes;

#endif
