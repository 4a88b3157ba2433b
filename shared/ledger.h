/* The ledger domain: validation, decide and evolve. Pure code: no I/O, no globals. */
#ifndef DAYBOOK_LEDGER_H
#define DAYBOOK_LEDGER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LEDGER_ID_MAX 64
#define LEDGER_NAME_MAX 200                         /* bytes of UTF-8 */
#define LEDGER_REFERENCE_MAX 200                    /* bytes of UTF-8 */
#define LEDGER_AMOUNT_MAX INT64_C(1000000000000000) /* 10^15 minor units */

/* Outcome of a decision. Each maps to one HTTP status and problem code. */
enum ledger_error {
	LEDGER_OK = 0,
	LEDGER_ACCOUNT_EXISTS,     /* 409 account_exists */
	LEDGER_ACCOUNT_NOT_FOUND,  /* 404 account_not_found */
	LEDGER_ACCOUNT_CLOSED,     /* 422 account_closed */
	LEDGER_OVERFLOW,           /* 422 overflow */
	LEDGER_INSUFFICIENT_FUNDS, /* 422 insufficient_funds */
	LEDGER_CURRENCY_MISMATCH,  /* 422 currency_mismatch */
	LEDGER_SAME_ACCOUNT,       /* 422 same_account */
	LEDGER_NONZERO_BALANCE,    /* 422 nonzero_balance */
	LEDGER_TRANSFER_EXISTS,    /* 409 transfer_exists */
	LEDGER_VERSION_MISMATCH,   /* 412 version_mismatch */
};

/* snake_case code of an error ("account_exists"); "ok" for LEDGER_OK. Static string. */
const char *ledger_error_code(enum ledger_error err);
/* HTTP status for an error (201 for LEDGER_OK). */
int ledger_error_status(enum ledger_error err);
/* A one-sentence human title ("Account already exists"). Static string. */
const char *ledger_error_title(enum ledger_error err);

enum ledger_event_type {
	LEDGER_ACCOUNT_OPENED = 1,
	LEDGER_FUNDS_DEPOSITED,
	LEDGER_FUNDS_WITHDRAWN,
	LEDGER_TRANSFER_SENT,
	LEDGER_TRANSFER_RECEIVED,
	/* Not LEDGER_ACCOUNT_CLOSED: that name is the error above. */
	LEDGER_ACCOUNT_CLOSED_EVENT,
};

/* Event name as stored in the log ("AccountOpened"); NULL for an unknown type. */
const char *ledger_event_name(enum ledger_event_type type);
/* Inverse of ledger_event_name; 0 when the name is unknown. */
enum ledger_event_type ledger_event_type_from_name(const char *name);

/* One event of an account stream. Strings are borrowed: the event never owns them,
 * the caller keeps them alive while the event is used. Fields that a type does not
 * use are ignored (and NULL / 0). */
struct ledger_event {
	enum ledger_event_type type;
	const char *account_id;   /* AccountOpened */
	const char *name;         /* AccountOpened */
	const char *currency;     /* AccountOpened */
	int64_t overdraft_limit;  /* AccountOpened */
	int64_t amount;           /* deposits, withdrawals, transfers */
	const char *reference;    /* optional: NULL when absent */
	const char *transfer_id;  /* TransferSent, TransferReceived */
	const char *counterparty; /* TransferSent: "to"; TransferReceived: "from" */
};

/* The state of one account, as folded from its stream. A zeroed struct is an
 * account that does not exist (version 0). */
struct ledger_account {
	char id[LEDGER_ID_MAX + 1];
	char currency[4];
	int64_t balance;
	int64_t overdraft_limit;
	int32_t version; /* number of events in the stream; 0: no such account */
	bool closed;
};

bool ledger_account_exists(const struct ledger_account *acc);

/* Apply one event to an account: version += 1 and the event's effect. Events come
 * from the log, which the deciders guarded, so evolve trusts them; it returns false
 * (and leaves *acc unchanged) only for an event that cannot apply (arithmetic
 * overflow, a second AccountOpened, an unknown type), which a fold reports. */
bool ledger_evolve(struct ledger_account *acc, const struct ledger_event *ev)
	__attribute__((warn_unused_result));

/* Validation of the shapes in SPEC §2. */
bool ledger_valid_id(const char *s);              /* 1-64 of [A-Za-z0-9._:-] */
bool ledger_valid_currency(const char *s);        /* three of [A-Z] */
bool ledger_valid_amount(int64_t amount);         /* [1, 10^15] */
bool ledger_valid_overdraft_limit(int64_t limit); /* >= 0 */
bool ledger_valid_text(const char *s, size_t max_bytes,
		       bool allow_empty); /* valid UTF-8, no control chars */

/* Deciders. Each looks at the current state and the command, and either returns
 * LEDGER_OK and fills `out` with the events to append, or returns the reason for
 * refusing and leaves `out` untouched. `expected_version` is the If-Match value, or
 * -1 when absent. Strings of the produced events borrow from the command arguments. */
enum ledger_error ledger_decide_open(const struct ledger_account *acc, const char *id,
				     const char *name, const char *currency,
				     int64_t overdraft_limit, struct ledger_event *out);
enum ledger_error ledger_decide_deposit(const struct ledger_account *acc, int32_t expected_version,
					int64_t amount, const char *reference,
					struct ledger_event *out);
enum ledger_error ledger_decide_withdraw(const struct ledger_account *acc, int32_t expected_version,
					 int64_t amount, const char *reference,
					 struct ledger_event *out);
enum ledger_error ledger_decide_close(const struct ledger_account *acc, int32_t expected_version,
				      struct ledger_event *out);
/* A transfer produces two events: out[0] TransferSent for `from`, out[1]
 * TransferReceived for `to`. Whether transfer_id is already used is not the
 * domain's to know: the caller checks the log and reports LEDGER_TRANSFER_EXISTS. */
enum ledger_error ledger_decide_transfer(const struct ledger_account *from,
					 const struct ledger_account *to, const char *transfer_id,
					 int64_t amount, const char *reference,
					 struct ledger_event out[2]);

#endif
