/* The ledger domain: shape validation, the deciders behind each command, and evolve. */
#include "ledger.h"

#include <string.h>

struct error_info {
	const char *code;
	int status;
	const char *title;
};

static const struct error_info errors[] = {
	[LEDGER_OK] = { "ok", 201, "OK" },
	[LEDGER_ACCOUNT_EXISTS] = { "account_exists", 409, "Account already exists" },
	[LEDGER_ACCOUNT_NOT_FOUND] = { "account_not_found", 404, "Account not found" },
	[LEDGER_ACCOUNT_CLOSED] = { "account_closed", 422, "Account is closed" },
	[LEDGER_OVERFLOW] = { "overflow", 422, "Balance would overflow" },
	[LEDGER_INSUFFICIENT_FUNDS] = { "insufficient_funds", 422, "Insufficient funds" },
	[LEDGER_CURRENCY_MISMATCH] = { "currency_mismatch", 422,
				       "Accounts have different currencies" },
	[LEDGER_SAME_ACCOUNT] = { "same_account", 422, "Cannot transfer to the same account" },
	[LEDGER_NONZERO_BALANCE] = { "nonzero_balance", 422, "Balance must be zero to close" },
	[LEDGER_TRANSFER_EXISTS] = { "transfer_exists", 409, "Transfer already exists" },
	[LEDGER_VERSION_MISMATCH] = { "version_mismatch", 412, "Version does not match If-Match" },
};

/* A value outside the enum is a caller's bug; answer it as a server error, never crash. */
static const struct error_info unknown_error = { "internal_error", 500, "Internal error" };

static const char *const event_names[] = {
	[LEDGER_ACCOUNT_OPENED] = "AccountOpened",
	[LEDGER_FUNDS_DEPOSITED] = "FundsDeposited",
	[LEDGER_FUNDS_WITHDRAWN] = "FundsWithdrawn",
	[LEDGER_TRANSFER_SENT] = "TransferSent",
	[LEDGER_TRANSFER_RECEIVED] = "TransferReceived",
	[LEDGER_ACCOUNT_CLOSED_EVENT] = "AccountClosed",
};

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static const struct error_info *error_info(enum ledger_error err)
{
	if ((unsigned)err >= COUNT(errors))
		return &unknown_error;
	return &errors[err];
}

const char *ledger_error_code(enum ledger_error err)
{
	return error_info(err)->code;
}

int ledger_error_status(enum ledger_error err)
{
	return error_info(err)->status;
}

const char *ledger_error_title(enum ledger_error err)
{
	return error_info(err)->title;
}

const char *ledger_event_name(enum ledger_event_type type)
{
	if ((unsigned)type >= COUNT(event_names))
		return NULL;
	return event_names[type];
}

enum ledger_event_type ledger_event_type_from_name(const char *name)
{
	if (!name)
		return (enum ledger_event_type)0;
	for (unsigned i = 1; i < COUNT(event_names); i++)
		if (strcmp(name, event_names[i]) == 0)
			return (enum ledger_event_type)i;
	return (enum ledger_event_type)0;
}

/* Validation */

/* Plain ranges rather than <ctype.h>, whose answers depend on the locale. */
static bool is_upper(unsigned char c)
{
	return c >= 'A' && c <= 'Z';
}

static bool is_id_char(unsigned char c)
{
	return is_upper(c) || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
	       c == '_' || c == ':' || c == '-';
}

bool ledger_valid_id(const char *s)
{
	size_t n = 0;

	if (!s)
		return false;
	for (; s[n]; n++)
		if (n == LEDGER_ID_MAX || !is_id_char((unsigned char)s[n]))
			return false;
	return n > 0;
}

bool ledger_valid_currency(const char *s)
{
	if (!s)
		return false;
	return is_upper((unsigned char)s[0]) && is_upper((unsigned char)s[1]) &&
	       is_upper((unsigned char)s[2]) && s[3] == '\0';
}

bool ledger_valid_amount(int64_t amount)
{
	return amount >= 1 && amount <= LEDGER_AMOUNT_MAX;
}

bool ledger_valid_overdraft_limit(int64_t limit)
{
	return limit >= 0;
}

/* Length of the well-formed UTF-8 sequence starting at s, 0 if ill-formed. The second
 * byte's range follows Unicode's table of well-formed sequences, which is what shuts
 * out overlong forms, surrogates and code points beyond U+10FFFF. A NUL is never a
 * continuation byte, so the scan stops at the end of the string. */
static size_t utf8_sequence(const unsigned char *s)
{
	unsigned char lead = s[0], lo = 0x80, hi = 0xBF;
	size_t len;

	if (lead < 0x80)
		return 1;
	if (lead < 0xC2 || lead > 0xF4)
		return 0;
	len = lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4;
	if (lead == 0xE0)
		lo = 0xA0;
	else if (lead == 0xED)
		hi = 0x9F;
	else if (lead == 0xF0)
		lo = 0x90;
	else if (lead == 0xF4)
		hi = 0x8F;
	if (s[1] < lo || s[1] > hi)
		return 0;
	for (size_t i = 2; i < len; i++)
		if ((s[i] & 0xC0) != 0x80)
			return 0;
	return len;
}

bool ledger_valid_text(const char *s, size_t max_bytes, bool allow_empty)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t len = 0, n;

	if (!s)
		return false;
	while (p[len]) {
		if (p[len] >= 0x20 && p[len] < 0x7F) { /* printable ASCII: most text */
			if (++len > max_bytes)
				return false;
			continue;
		}
		if (p[len] < 0x20 || p[len] == 0x7F)
			return false;
		n = utf8_sequence(p + len);
		if (n == 0)
			return false;
		len += n;
		if (len > max_bytes)
			return false;
	}
	return len > 0 || allow_empty;
}

/* Deciders */

bool ledger_account_exists(const struct ledger_account *acc)
{
	return acc && acc->version > 0;
}

/* What every account-scoped command checks before its own rule, in this order. */
static enum ledger_error check_account(const struct ledger_account *acc, int32_t expected_version)
{
	if (!ledger_account_exists(acc))
		return LEDGER_ACCOUNT_NOT_FOUND;
	if (expected_version != -1 && expected_version != acc->version)
		return LEDGER_VERSION_MISMATCH;
	if (acc->closed)
		return LEDGER_ACCOUNT_CLOSED;
	return LEDGER_OK;
}

/* Money leaving an account. Going below int64 is reported as overflow, as the spec
 * asks of any operation that would overflow, before the overdraft rule. */
static enum ledger_error check_debit(const struct ledger_account *acc, int64_t amount)
{
	int64_t after;
	int64_t floor = acc->overdraft_limit > 0 ? -acc->overdraft_limit : 0;

	if (__builtin_sub_overflow(acc->balance, amount, &after))
		return LEDGER_OVERFLOW;
	if (after < floor)
		return LEDGER_INSUFFICIENT_FUNDS;
	return LEDGER_OK;
}

static enum ledger_error check_credit(const struct ledger_account *acc, int64_t amount)
{
	int64_t after;

	if (__builtin_add_overflow(acc->balance, amount, &after))
		return LEDGER_OVERFLOW;
	return LEDGER_OK;
}

static struct ledger_event money_event(enum ledger_event_type type, int64_t amount,
				       const char *reference)
{
	return (struct ledger_event){ .type = type, .amount = amount, .reference = reference };
}

enum ledger_error ledger_decide_open(const struct ledger_account *acc, const char *id,
				     const char *name, const char *currency,
				     int64_t overdraft_limit, struct ledger_event *out)
{
	if (ledger_account_exists(acc))
		return LEDGER_ACCOUNT_EXISTS;
	*out = (struct ledger_event){
		.type = LEDGER_ACCOUNT_OPENED,
		.account_id = id,
		.name = name,
		.currency = currency,
		.overdraft_limit = overdraft_limit,
	};
	return LEDGER_OK;
}

enum ledger_error ledger_decide_deposit(const struct ledger_account *acc, int32_t expected_version,
					int64_t amount, const char *reference,
					struct ledger_event *out)
{
	enum ledger_error err = check_account(acc, expected_version);

	if (err == LEDGER_OK)
		err = check_credit(acc, amount);
	if (err == LEDGER_OK)
		*out = money_event(LEDGER_FUNDS_DEPOSITED, amount, reference);
	return err;
}

enum ledger_error ledger_decide_withdraw(const struct ledger_account *acc, int32_t expected_version,
					 int64_t amount, const char *reference,
					 struct ledger_event *out)
{
	enum ledger_error err = check_account(acc, expected_version);

	if (err == LEDGER_OK)
		err = check_debit(acc, amount);
	if (err == LEDGER_OK)
		*out = money_event(LEDGER_FUNDS_WITHDRAWN, amount, reference);
	return err;
}

enum ledger_error ledger_decide_close(const struct ledger_account *acc, int32_t expected_version,
				      struct ledger_event *out)
{
	enum ledger_error err = check_account(acc, expected_version);

	if (err != LEDGER_OK)
		return err;
	if (acc->balance != 0)
		return LEDGER_NONZERO_BALANCE;
	*out = (struct ledger_event){ .type = LEDGER_ACCOUNT_CLOSED_EVENT };
	return LEDGER_OK;
}

/* The state structs carry no id for an account that does not exist, so the same
 * pointer twice also counts: a caller that sees from == to in the body may pass one
 * struct for both and gets same_account even when that account is missing. */
static bool same_account(const struct ledger_account *from, const struct ledger_account *to)
{
	if (from == to)
		return true;
	return from->id[0] != '\0' && strncmp(from->id, to->id, sizeof(from->id)) == 0;
}

/* The transfer's rules, after same_account, existence and closed were ruled out. */
static enum ledger_error check_transfer(const struct ledger_account *from,
					const struct ledger_account *to, int64_t amount)
{
	enum ledger_error err;

	if (strncmp(from->currency, to->currency, sizeof(from->currency)) != 0)
		return LEDGER_CURRENCY_MISMATCH;
	err = check_debit(from, amount);
	if (err == LEDGER_OK)
		err = check_credit(to, amount);
	return err;
}

enum ledger_error ledger_decide_transfer(const struct ledger_account *from,
					 const struct ledger_account *to, const char *transfer_id,
					 int64_t amount, const char *reference,
					 struct ledger_event out[2])
{
	enum ledger_error err;

	if (from && to && same_account(from, to))
		return LEDGER_SAME_ACCOUNT;
	if (!ledger_account_exists(from) || !ledger_account_exists(to))
		return LEDGER_ACCOUNT_NOT_FOUND;
	if (from->closed || to->closed)
		return LEDGER_ACCOUNT_CLOSED;
	err = check_transfer(from, to, amount);
	if (err != LEDGER_OK)
		return err;
	out[0] = money_event(LEDGER_TRANSFER_SENT, amount, reference);
	out[0].transfer_id = transfer_id;
	out[0].counterparty = to->id;
	out[1] = money_event(LEDGER_TRANSFER_RECEIVED, amount, reference);
	out[1].transfer_id = transfer_id;
	out[1].counterparty = from->id;
	return LEDGER_OK;
}

/* Evolve */

/* The id and currency are copied into fixed buffers, so strings that do not fit are
 * refused rather than truncated: a fold must not invent an account. */
static bool apply_opened(struct ledger_account *acc, const struct ledger_event *ev)
{
	size_t id_len;

	if (ledger_account_exists(acc) || !ev->account_id || !ev->currency)
		return false;
	id_len = strlen(ev->account_id);
	if (id_len == 0 || id_len > LEDGER_ID_MAX || strlen(ev->currency) != 3 ||
	    ev->overdraft_limit < 0)
		return false;
	*acc = (struct ledger_account){ .overdraft_limit = ev->overdraft_limit };
	memcpy(acc->id, ev->account_id, id_len + 1);
	memcpy(acc->currency, ev->currency, sizeof(acc->currency));
	return true;
}

static bool apply(struct ledger_account *acc, const struct ledger_event *ev)
{
	if (ev->type == LEDGER_ACCOUNT_OPENED)
		return apply_opened(acc, ev);
	/* Anything but an opening needs an account to act on. */
	if (!ledger_account_exists(acc))
		return false;
	switch (ev->type) {
	case LEDGER_FUNDS_DEPOSITED:
	case LEDGER_TRANSFER_RECEIVED:
		return !__builtin_add_overflow(acc->balance, ev->amount, &acc->balance);
	case LEDGER_FUNDS_WITHDRAWN:
	case LEDGER_TRANSFER_SENT:
		return !__builtin_sub_overflow(acc->balance, ev->amount, &acc->balance);
	case LEDGER_ACCOUNT_CLOSED_EVENT:
		acc->closed = true;
		return true;
	default:
		return false;
	}
}

bool ledger_evolve(struct ledger_account *acc, const struct ledger_event *ev)
{
	struct ledger_account next;

	if (!acc || !ev)
		return false;
	/* Work on a copy so that a refused event leaves the caller's state as it was. */
	next = *acc;
	if (!apply(&next, ev) || __builtin_add_overflow(acc->version, 1, &next.version))
		return false;
	*acc = next;
	return true;
}
