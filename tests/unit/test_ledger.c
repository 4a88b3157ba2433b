/* Unit tests of the ledger domain: validation, each decider's rules and order, evolve. */
#include <criterion/criterion.h>
#include <string.h>

#include "ledger.h"

/* An open account as the fold would leave it, with the balance set directly so that
 * the int64 edges are reachable without 9,000 deposits. */
static struct ledger_account account(const char *id, const char *currency, int64_t balance,
				     int64_t overdraft_limit)
{
	struct ledger_account acc = { .balance = balance,
				      .overdraft_limit = overdraft_limit,
				      .version = 3 };

	strcpy(acc.id, id);
	strcpy(acc.currency, currency);
	return acc;
}

static struct ledger_account closed_account(const char *id, int64_t balance)
{
	struct ledger_account acc = account(id, "EUR", balance, 0);

	acc.closed = true;
	return acc;
}

/* A recognisable event, to show that a refusing decider left `out` alone. */
static const struct ledger_event sentinel = { .type = 99,
					      .amount = 4242,
					      .reference = "untouched" };

static void assert_untouched(const struct ledger_event *ev)
{
	cr_assert_eq(ev->type, sentinel.type);
	cr_assert_eq(ev->amount, sentinel.amount);
	cr_assert_str_eq(ev->reference, sentinel.reference);
}

static void assert_same_state(const struct ledger_account *a, const struct ledger_account *b)
{
	cr_assert_str_eq(a->id, b->id);
	cr_assert_str_eq(a->currency, b->currency);
	cr_assert_eq(a->balance, b->balance);
	cr_assert_eq(a->overdraft_limit, b->overdraft_limit);
	cr_assert_eq(a->version, b->version);
	cr_assert_eq(a->closed, b->closed);
}

/* Errors and names */

Test(errors, every_code_has_its_status_and_a_title)
{
	static const struct {
		enum ledger_error err;
		const char *code;
		int status;
	} cases[] = {
		{ LEDGER_OK, "ok", 201 },
		{ LEDGER_ACCOUNT_EXISTS, "account_exists", 409 },
		{ LEDGER_ACCOUNT_NOT_FOUND, "account_not_found", 404 },
		{ LEDGER_ACCOUNT_CLOSED, "account_closed", 422 },
		{ LEDGER_OVERFLOW, "overflow", 422 },
		{ LEDGER_INSUFFICIENT_FUNDS, "insufficient_funds", 422 },
		{ LEDGER_CURRENCY_MISMATCH, "currency_mismatch", 422 },
		{ LEDGER_SAME_ACCOUNT, "same_account", 422 },
		{ LEDGER_NONZERO_BALANCE, "nonzero_balance", 422 },
		{ LEDGER_TRANSFER_EXISTS, "transfer_exists", 409 },
		{ LEDGER_VERSION_MISMATCH, "version_mismatch", 412 },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		cr_assert_str_eq(ledger_error_code(cases[i].err), cases[i].code);
		cr_assert_eq(ledger_error_status(cases[i].err), cases[i].status, "%s",
			     cases[i].code);
		cr_assert_not_null(ledger_error_title(cases[i].err));
		cr_assert_gt(strlen(ledger_error_title(cases[i].err)), 0);
	}
}

Test(errors, titles_differ_between_codes)
{
	for (int a = LEDGER_OK; a <= LEDGER_VERSION_MISMATCH; a++)
		for (int b = a + 1; b <= LEDGER_VERSION_MISMATCH; b++)
			cr_assert_str_neq(ledger_error_title((enum ledger_error)a),
					  ledger_error_title((enum ledger_error)b));
}

Test(errors, out_of_range_value_is_a_server_error)
{
	enum ledger_error bogus = (enum ledger_error)1000;

	cr_assert_str_eq(ledger_error_code(bogus), "internal_error");
	cr_assert_eq(ledger_error_status(bogus), 500);
	cr_assert_not_null(ledger_error_title(bogus));
}

Test(events, names_match_the_log_contract_both_ways)
{
	static const struct {
		enum ledger_event_type type;
		const char *name;
	} cases[] = {
		{ LEDGER_ACCOUNT_OPENED, "AccountOpened" },
		{ LEDGER_FUNDS_DEPOSITED, "FundsDeposited" },
		{ LEDGER_FUNDS_WITHDRAWN, "FundsWithdrawn" },
		{ LEDGER_TRANSFER_SENT, "TransferSent" },
		{ LEDGER_TRANSFER_RECEIVED, "TransferReceived" },
		{ LEDGER_ACCOUNT_CLOSED_EVENT, "AccountClosed" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		cr_assert_str_eq(ledger_event_name(cases[i].type), cases[i].name);
		cr_assert_eq(ledger_event_type_from_name(cases[i].name), cases[i].type);
	}
}

Test(events, unknown_names_and_types)
{
	cr_assert_null(ledger_event_name((enum ledger_event_type)0));
	cr_assert_null(ledger_event_name((enum ledger_event_type)7));
	cr_assert_null(ledger_event_name((enum ledger_event_type) - 1));
	cr_assert_eq(ledger_event_type_from_name("accountopened"), 0);
	cr_assert_eq(ledger_event_type_from_name("AccountOpened "), 0);
	cr_assert_eq(ledger_event_type_from_name(""), 0);
	cr_assert_eq(ledger_event_type_from_name(NULL), 0);
}

/* Validation */

Test(validate, id_accepts_every_allowed_character)
{
	cr_assert(ledger_valid_id("a"));
	cr_assert(ledger_valid_id("ABCXYZabcxyz0189._:-"));
	cr_assert(ledger_valid_id("acc-1:eu.main_2"));
	cr_assert(ledger_valid_id("-"));
}

Test(validate, id_length_is_1_to_64)
{
	char id[LEDGER_ID_MAX + 2];

	memset(id, 'x', sizeof(id) - 1);
	id[LEDGER_ID_MAX] = '\0';
	cr_assert(ledger_valid_id(id));
	id[LEDGER_ID_MAX] = 'x';
	id[LEDGER_ID_MAX + 1] = '\0';
	cr_assert_not(ledger_valid_id(id));
	cr_assert_not(ledger_valid_id(""));
	cr_assert_not(ledger_valid_id(NULL));
}

Test(validate, id_refuses_other_characters)
{
	static const char *const bad[] = { "a b",  "a/b",  "a+b",  "a@b", "a#b", "\xc3\xa9",
					   "a\tb", "a\nb", "a%2F", "a,b", "(a)", "a*" };

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert_not(ledger_valid_id(bad[i]), "%s", bad[i]);
}

Test(validate, currency_is_three_upper_case_letters)
{
	cr_assert(ledger_valid_currency("EUR"));
	cr_assert(ledger_valid_currency("AZZ"));
	cr_assert_not(ledger_valid_currency("eur"));
	cr_assert_not(ledger_valid_currency("EUr"));
	cr_assert_not(ledger_valid_currency("EU"));
	cr_assert_not(ledger_valid_currency("EURO"));
	cr_assert_not(ledger_valid_currency("E1R"));
	cr_assert_not(ledger_valid_currency("E R"));
	cr_assert_not(ledger_valid_currency("@[`"));
	cr_assert_not(ledger_valid_currency(""));
	cr_assert_not(ledger_valid_currency(NULL));
}

Test(validate, amount_is_1_to_10_to_the_15)
{
	cr_assert(ledger_valid_amount(1));
	cr_assert(ledger_valid_amount(LEDGER_AMOUNT_MAX));
	cr_assert_eq(LEDGER_AMOUNT_MAX, INT64_C(1000000000000000));
	cr_assert_not(ledger_valid_amount(0));
	cr_assert_not(ledger_valid_amount(-1));
	cr_assert_not(ledger_valid_amount(LEDGER_AMOUNT_MAX + 1));
	cr_assert_not(ledger_valid_amount(INT64_MAX));
	cr_assert_not(ledger_valid_amount(INT64_MIN));
}

Test(validate, overdraft_limit_is_non_negative)
{
	cr_assert(ledger_valid_overdraft_limit(0));
	cr_assert(ledger_valid_overdraft_limit(1));
	cr_assert(ledger_valid_overdraft_limit(INT64_MAX));
	cr_assert_not(ledger_valid_overdraft_limit(-1));
	cr_assert_not(ledger_valid_overdraft_limit(INT64_MIN));
}

Test(validate, text_accepts_well_formed_utf8_up_to_the_edges)
{
	static const char *const good[] = {
		"plain ascii ~",
		"\xc2\x80",         /* U+0080, first two-byte */
		"\xdf\xbf",         /* U+07FF, last two-byte */
		"\xe0\xa0\x80",     /* U+0800, first three-byte */
		"\xed\x9f\xbf",     /* U+D7FF, just below the surrogates */
		"\xee\x80\x80",     /* U+E000, just above them */
		"\xef\xbf\xbf",     /* U+FFFF */
		"\xf0\x90\x80\x80", /* U+10000, first four-byte */
		"\xf4\x8f\xbf\xbf", /* U+10FFFF, the last code point */
		"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
	};

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		cr_assert(ledger_valid_text(good[i], 200, false), "case %zu", i);
}

Test(validate, text_refuses_overlong_forms)
{
	cr_assert_not(ledger_valid_text("\xc0\x80", 200, false)); /* NUL in 2 bytes */
	cr_assert_not(ledger_valid_text("\xc0\xaf", 200, false)); /* '/' in 2 bytes */
	cr_assert_not(ledger_valid_text("\xc1\xbf", 200, false));
	cr_assert_not(ledger_valid_text("\xe0\x80\xaf", 200, false));
	cr_assert_not(ledger_valid_text("\xe0\x9f\xbf", 200, false)); /* U+07FF in 3 bytes */
	cr_assert_not(ledger_valid_text("\xf0\x80\x80\xaf", 200, false));
	cr_assert_not(ledger_valid_text("\xf0\x8f\xbf\xbf", 200, false)); /* U+FFFF in 4 bytes */
}

Test(validate, text_refuses_surrogates_and_beyond_unicode)
{
	cr_assert_not(ledger_valid_text("\xed\xa0\x80", 200, false));             /* U+D800 */
	cr_assert_not(ledger_valid_text("\xed\xbf\xbf", 200, false));             /* U+DFFF */
	cr_assert_not(ledger_valid_text("\xed\xa0\xbd\xed\xb8\x80", 200, false)); /* CESU pair */
	cr_assert_not(ledger_valid_text("\xf4\x90\x80\x80", 200, false));         /* U+110000 */
	cr_assert_not(ledger_valid_text("\xf5\x80\x80\x80", 200, false));
	cr_assert_not(ledger_valid_text("\xf7\xbf\xbf\xbf", 200, false));
	cr_assert_not(ledger_valid_text("\xf8\x88\x80\x80\x80", 200, false));
	cr_assert_not(ledger_valid_text("\xfe", 200, false));
	cr_assert_not(ledger_valid_text("\xff", 200, false));
}

Test(validate, text_refuses_broken_sequences)
{
	cr_assert_not(ledger_valid_text("\x80", 200, false)); /* lone continuation */
	cr_assert_not(ledger_valid_text("a\xbf"
					"b",
					200, false));
	cr_assert_not(ledger_valid_text("\xc3\x28", 200, false)); /* bad continuation */
	cr_assert_not(ledger_valid_text("\xe2\x82", 200, false)); /* truncated at end */
	cr_assert_not(ledger_valid_text("\xe2\x82"
					"a",
					200, false)); /* truncated mid-string */
	cr_assert_not(ledger_valid_text("a\xc3", 200, false));
	cr_assert_not(ledger_valid_text("\xf0\x9f\x98", 200, false));
	cr_assert_not(ledger_valid_text("\xe2\x82\xac\xac", 200, false)); /* extra continuation */
}

Test(validate, text_refuses_c0_controls_and_del)
{
	char s[] = "a?b";

	for (int c = 1; c < 0x20; c++) {
		s[1] = (char)c;
		cr_assert_not(ledger_valid_text(s, 200, true), "control 0x%02x", c);
	}
	s[1] = 0x7f;
	cr_assert_not(ledger_valid_text(s, 200, true));
	s[1] = ' ';
	cr_assert(ledger_valid_text(s, 200, true));
}

Test(validate, text_length_counts_bytes_not_characters)
{
	char s[202];

	memset(s, 'a', 200);
	s[200] = '\0';
	cr_assert(ledger_valid_text(s, 200, false));
	s[200] = 'a';
	s[201] = '\0';
	cr_assert_not(ledger_valid_text(s, 200, false));
	/* "é" is one character but two bytes. */
	cr_assert(ledger_valid_text("\xc3\xa9", 2, false));
	cr_assert_not(ledger_valid_text("\xc3\xa9", 1, false));
	cr_assert_not(ledger_valid_text("\xf0\x9f\x98\x80", 3, false));
	cr_assert(ledger_valid_text("\xf0\x9f\x98\x80", 4, false));
}

Test(validate, text_empty_only_when_allowed)
{
	cr_assert(ledger_valid_text("", 200, true));
	cr_assert_not(ledger_valid_text("", 200, false));
	cr_assert(ledger_valid_text("", 0, true));
	cr_assert_not(ledger_valid_text(NULL, 200, true));
}

/* Open */

Test(decide_open, new_account_gives_account_opened)
{
	struct ledger_account none = { 0 };
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_open(&none, "acc-1", "Alice", "EUR", 500, &ev), LEDGER_OK);
	cr_assert_eq(ev.type, LEDGER_ACCOUNT_OPENED);
	cr_assert_str_eq(ev.account_id, "acc-1");
	cr_assert_str_eq(ev.name, "Alice");
	cr_assert_str_eq(ev.currency, "EUR");
	cr_assert_eq(ev.overdraft_limit, 500);
	cr_assert_eq(ev.amount, 0);
	cr_assert_null(ev.reference);
	cr_assert_null(ev.transfer_id);
}

Test(decide_open, null_state_means_no_account)
{
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_open(NULL, "acc-1", "Alice", "EUR", 0, &ev), LEDGER_OK);
	cr_assert_eq(ev.type, LEDGER_ACCOUNT_OPENED);
}

Test(decide_open, existing_account_is_refused)
{
	struct ledger_account acc = account("acc-1", "EUR", 0, 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_open(&acc, "acc-1", "Alice", "EUR", 0, &ev),
		     LEDGER_ACCOUNT_EXISTS);
	assert_untouched(&ev);
}

Test(decide_open, closed_account_id_is_not_reused)
{
	struct ledger_account acc = closed_account("acc-1", 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_open(&acc, "acc-1", "Bob", "USD", 0, &ev),
		     LEDGER_ACCOUNT_EXISTS);
	assert_untouched(&ev);
}

/* Deposit */

Test(decide_deposit, adds_funds_event)
{
	struct ledger_account acc = account("a", "EUR", 100, 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_deposit(&acc, -1, 250, "salary", &ev), LEDGER_OK);
	cr_assert_eq(ev.type, LEDGER_FUNDS_DEPOSITED);
	cr_assert_eq(ev.amount, 250);
	cr_assert_str_eq(ev.reference, "salary");
	cr_assert_null(ev.account_id);
	cr_assert_null(ev.counterparty);
}

Test(decide_deposit, absent_reference_stays_null)
{
	struct ledger_account acc = account("a", "EUR", 0, 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_deposit(&acc, -1, 1, NULL, &ev), LEDGER_OK);
	cr_assert_null(ev.reference);
}

Test(decide_deposit, missing_account)
{
	struct ledger_account none = { 0 };
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_deposit(&none, -1, 1, NULL, &ev), LEDGER_ACCOUNT_NOT_FOUND);
	cr_assert_eq(ledger_decide_deposit(NULL, -1, 1, NULL, &ev), LEDGER_ACCOUNT_NOT_FOUND);
	assert_untouched(&ev);
}

Test(decide_deposit, expected_version_must_match)
{
	struct ledger_account acc = account("a", "EUR", 0, 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_deposit(&acc, 2, 1, NULL, &ev), LEDGER_VERSION_MISMATCH);
	cr_assert_eq(ledger_decide_deposit(&acc, 4, 1, NULL, &ev), LEDGER_VERSION_MISMATCH);
	cr_assert_eq(ledger_decide_deposit(&acc, 0, 1, NULL, &ev), LEDGER_VERSION_MISMATCH);
	assert_untouched(&ev);
	cr_assert_eq(ledger_decide_deposit(&acc, 3, 1, NULL, &ev), LEDGER_OK);
}

Test(decide_deposit, closed_account)
{
	struct ledger_account acc = closed_account("a", 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_deposit(&acc, -1, 1, NULL, &ev), LEDGER_ACCOUNT_CLOSED);
	assert_untouched(&ev);
}

Test(decide_deposit, overflow_at_int64_max)
{
	struct ledger_account acc = account("a", "EUR", INT64_MAX - 10, 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_deposit(&acc, -1, 11, NULL, &ev), LEDGER_OVERFLOW);
	assert_untouched(&ev);
	cr_assert_eq(ledger_decide_deposit(&acc, -1, 10, NULL, &ev), LEDGER_OK);
	acc.balance = INT64_MAX;
	cr_assert_eq(ledger_decide_deposit(&acc, -1, 1, NULL, &ev), LEDGER_OVERFLOW);
	cr_assert_eq(ledger_decide_deposit(&acc, -1, LEDGER_AMOUNT_MAX, NULL, &ev),
		     LEDGER_OVERFLOW);
}

Test(decide_deposit, check_order)
{
	struct ledger_account none = { 0 };
	struct ledger_account closed_full = closed_account("a", INT64_MAX);
	struct ledger_event ev = sentinel;

	/* not found before version: a missing account has no version to compare */
	cr_assert_eq(ledger_decide_deposit(&none, 7, 1, NULL, &ev), LEDGER_ACCOUNT_NOT_FOUND);
	/* version before closed */
	cr_assert_eq(ledger_decide_deposit(&closed_full, 7, 1, NULL, &ev), LEDGER_VERSION_MISMATCH);
	/* closed before the overflow rule */
	cr_assert_eq(ledger_decide_deposit(&closed_full, 3, 1, NULL, &ev), LEDGER_ACCOUNT_CLOSED);
	assert_untouched(&ev);
}

/* Withdraw */

Test(decide_withdraw, takes_funds_event)
{
	struct ledger_account acc = account("a", "EUR", 100, 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_withdraw(&acc, 3, 40, "rent", &ev), LEDGER_OK);
	cr_assert_eq(ev.type, LEDGER_FUNDS_WITHDRAWN);
	cr_assert_eq(ev.amount, 40);
	cr_assert_str_eq(ev.reference, "rent");
}

Test(decide_withdraw, without_overdraft_stops_at_zero)
{
	struct ledger_account acc = account("a", "EUR", 100, 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 101, NULL, &ev), LEDGER_INSUFFICIENT_FUNDS);
	assert_untouched(&ev);
	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 100, NULL, &ev), LEDGER_OK);
}

Test(decide_withdraw, overdraft_reaches_minus_limit_not_below)
{
	struct ledger_account acc = account("a", "EUR", 100, 50);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 151, NULL, &ev), LEDGER_INSUFFICIENT_FUNDS);
	assert_untouched(&ev);
	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 150, NULL, &ev), LEDGER_OK);
	acc.balance = -50;
	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 1, NULL, &ev), LEDGER_INSUFFICIENT_FUNDS);
}

Test(decide_withdraw, missing_mismatched_closed)
{
	struct ledger_account none = { 0 };
	struct ledger_account acc = account("a", "EUR", 100, 0);
	struct ledger_account closed = closed_account("a", 100);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_withdraw(&none, -1, 1, NULL, &ev), LEDGER_ACCOUNT_NOT_FOUND);
	cr_assert_eq(ledger_decide_withdraw(&acc, 1, 1, NULL, &ev), LEDGER_VERSION_MISMATCH);
	cr_assert_eq(ledger_decide_withdraw(&closed, -1, 1, NULL, &ev), LEDGER_ACCOUNT_CLOSED);
	assert_untouched(&ev);
}

Test(decide_withdraw, check_order)
{
	struct ledger_account none = { 0 };
	struct ledger_account closed_empty = closed_account("a", 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_withdraw(&none, 9, 5, NULL, &ev), LEDGER_ACCOUNT_NOT_FOUND);
	cr_assert_eq(ledger_decide_withdraw(&closed_empty, 9, 5, NULL, &ev),
		     LEDGER_VERSION_MISMATCH);
	/* closed before insufficient funds */
	cr_assert_eq(ledger_decide_withdraw(&closed_empty, 3, 5, NULL, &ev), LEDGER_ACCOUNT_CLOSED);
	assert_untouched(&ev);
}

Test(decide_withdraw, int64_floor_with_huge_overdraft)
{
	/* The limit lets the balance reach INT64_MIN + 1, the lowest -limit can be. */
	struct ledger_account acc = account("a", "EUR", INT64_MIN + 2, INT64_MAX);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 1, NULL, &ev), LEDGER_OK);
	acc.balance = INT64_MIN + 1;
	ev = sentinel;
	/* INT64_MIN is representable but below -INT64_MAX */
	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 1, NULL, &ev), LEDGER_INSUFFICIENT_FUNDS);
	/* one further would not fit in int64 at all */
	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 2, NULL, &ev), LEDGER_OVERFLOW);
	cr_assert_eq(ledger_decide_withdraw(&acc, -1, LEDGER_AMOUNT_MAX, NULL, &ev),
		     LEDGER_OVERFLOW);
	assert_untouched(&ev);
}

Test(decide_withdraw, negative_limit_in_state_counts_as_zero)
{
	struct ledger_account acc = account("a", "EUR", 10, -5);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 11, NULL, &ev), LEDGER_INSUFFICIENT_FUNDS);
	acc.overdraft_limit = INT64_MIN;
	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 11, NULL, &ev), LEDGER_INSUFFICIENT_FUNDS);
	cr_assert_eq(ledger_decide_withdraw(&acc, -1, 10, NULL, &ev), LEDGER_OK);
}

/* Close */

Test(decide_close, zero_balance_closes)
{
	struct ledger_account acc = account("a", "EUR", 0, 100);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_close(&acc, 3, &ev), LEDGER_OK);
	cr_assert_eq(ev.type, LEDGER_ACCOUNT_CLOSED_EVENT);
	cr_assert_eq(ev.amount, 0);
	cr_assert_null(ev.reference);
}

Test(decide_close, nonzero_balance_either_sign)
{
	struct ledger_account acc = account("a", "EUR", 1, 100);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_close(&acc, -1, &ev), LEDGER_NONZERO_BALANCE);
	acc.balance = -1;
	cr_assert_eq(ledger_decide_close(&acc, -1, &ev), LEDGER_NONZERO_BALANCE);
	assert_untouched(&ev);
}

Test(decide_close, missing_mismatched_already_closed)
{
	struct ledger_account none = { 0 };
	struct ledger_account acc = account("a", "EUR", 0, 0);
	struct ledger_account closed = closed_account("a", 0);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_close(&none, -1, &ev), LEDGER_ACCOUNT_NOT_FOUND);
	cr_assert_eq(ledger_decide_close(&acc, 2, &ev), LEDGER_VERSION_MISMATCH);
	cr_assert_eq(ledger_decide_close(&closed, -1, &ev), LEDGER_ACCOUNT_CLOSED);
	assert_untouched(&ev);
}

Test(decide_close, check_order)
{
	struct ledger_account none = { 0 };
	struct ledger_account closed_funded = closed_account("a", 10);
	struct ledger_event ev = sentinel;

	cr_assert_eq(ledger_decide_close(&none, 1, &ev), LEDGER_ACCOUNT_NOT_FOUND);
	cr_assert_eq(ledger_decide_close(&closed_funded, 1, &ev), LEDGER_VERSION_MISMATCH);
	cr_assert_eq(ledger_decide_close(&closed_funded, 3, &ev), LEDGER_ACCOUNT_CLOSED);
	assert_untouched(&ev);
}

/* Transfer */

Test(decide_transfer, gives_sent_and_received)
{
	struct ledger_account from = account("alice", "EUR", 1000, 0);
	struct ledger_account to = account("bob", "EUR", 5, 0);
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&from, &to, "t-1", 300, "lunch", out), LEDGER_OK);
	cr_assert_eq(out[0].type, LEDGER_TRANSFER_SENT);
	cr_assert_str_eq(out[0].transfer_id, "t-1");
	cr_assert_str_eq(out[0].counterparty, "bob");
	cr_assert_eq(out[0].amount, 300);
	cr_assert_str_eq(out[0].reference, "lunch");
	cr_assert_eq(out[1].type, LEDGER_TRANSFER_RECEIVED);
	cr_assert_str_eq(out[1].transfer_id, "t-1");
	cr_assert_str_eq(out[1].counterparty, "alice");
	cr_assert_eq(out[1].amount, 300);
	cr_assert_str_eq(out[1].reference, "lunch");
}

Test(decide_transfer, same_account_by_id_or_pointer)
{
	struct ledger_account a = account("alice", "EUR", 1000, 0);
	struct ledger_account a_again = a;
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&a, &a_again, "t", 1, NULL, out), LEDGER_SAME_ACCOUNT);
	cr_assert_eq(ledger_decide_transfer(&a, &a, "t", 1, NULL, out), LEDGER_SAME_ACCOUNT);
	assert_untouched(&out[0]);
	assert_untouched(&out[1]);
}

Test(decide_transfer, same_account_is_checked_first)
{
	struct ledger_account none = { 0 };
	struct ledger_account closed = closed_account("alice", 0);
	struct ledger_account closed_again = closed;
	struct ledger_event out[2] = { sentinel, sentinel };

	/* before not found (one struct passed twice) and before closed */
	cr_assert_eq(ledger_decide_transfer(&none, &none, "t", 1, NULL, out), LEDGER_SAME_ACCOUNT);
	cr_assert_eq(ledger_decide_transfer(&closed, &closed_again, "t", 1, NULL, out),
		     LEDGER_SAME_ACCOUNT);
	assert_untouched(&out[0]);
}

Test(decide_transfer, two_distinct_missing_accounts_are_not_the_same)
{
	struct ledger_account none1 = { 0 }, none2 = { 0 };
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&none1, &none2, "t", 1, NULL, out),
		     LEDGER_ACCOUNT_NOT_FOUND);
}

Test(decide_transfer, missing_either_side)
{
	struct ledger_account a = account("alice", "EUR", 1000, 0);
	struct ledger_account none = { 0 };
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&a, &none, "t", 1, NULL, out),
		     LEDGER_ACCOUNT_NOT_FOUND);
	cr_assert_eq(ledger_decide_transfer(&none, &a, "t", 1, NULL, out),
		     LEDGER_ACCOUNT_NOT_FOUND);
	cr_assert_eq(ledger_decide_transfer(&a, NULL, "t", 1, NULL, out), LEDGER_ACCOUNT_NOT_FOUND);
	cr_assert_eq(ledger_decide_transfer(NULL, &a, "t", 1, NULL, out), LEDGER_ACCOUNT_NOT_FOUND);
	assert_untouched(&out[0]);
	assert_untouched(&out[1]);
}

Test(decide_transfer, closed_either_side)
{
	struct ledger_account a = account("alice", "EUR", 1000, 0);
	struct ledger_account b = closed_account("bob", 0);
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 1, NULL, out), LEDGER_ACCOUNT_CLOSED);
	cr_assert_eq(ledger_decide_transfer(&b, &a, "t", 1, NULL, out), LEDGER_ACCOUNT_CLOSED);
	assert_untouched(&out[0]);
}

Test(decide_transfer, not_found_before_closed)
{
	struct ledger_account closed = closed_account("alice", 0);
	struct ledger_account none = { 0 };
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&closed, &none, "t", 1, NULL, out),
		     LEDGER_ACCOUNT_NOT_FOUND);
	cr_assert_eq(ledger_decide_transfer(&none, &closed, "t", 1, NULL, out),
		     LEDGER_ACCOUNT_NOT_FOUND);
}

Test(decide_transfer, currency_mismatch)
{
	struct ledger_account a = account("alice", "EUR", 1000, 0);
	struct ledger_account b = account("bob", "USD", 0, 0);
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 1, NULL, out), LEDGER_CURRENCY_MISMATCH);
	assert_untouched(&out[0]);
}

Test(decide_transfer, closed_before_currency_mismatch)
{
	struct ledger_account a = account("alice", "EUR", 1000, 0);
	struct ledger_account b = closed_account("bob", 0);
	struct ledger_event out[2] = { sentinel, sentinel };

	strcpy(b.currency, "USD");
	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 1, NULL, out), LEDGER_ACCOUNT_CLOSED);
}

Test(decide_transfer, sender_overdraft_limit)
{
	struct ledger_account a = account("alice", "EUR", 100, 20);
	struct ledger_account b = account("bob", "EUR", 0, 0);
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 121, NULL, out),
		     LEDGER_INSUFFICIENT_FUNDS);
	assert_untouched(&out[0]);
	assert_untouched(&out[1]);
	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 120, NULL, out), LEDGER_OK);
}

Test(decide_transfer, currency_mismatch_before_insufficient_funds)
{
	struct ledger_account a = account("alice", "EUR", 0, 0);
	struct ledger_account b = account("bob", "GBP", 0, 0);
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 1, NULL, out), LEDGER_CURRENCY_MISMATCH);
}

Test(decide_transfer, receiver_overflow)
{
	struct ledger_account a = account("alice", "EUR", 1000, 0);
	struct ledger_account b = account("bob", "EUR", INT64_MAX - 999, 0);
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 1000, NULL, out), LEDGER_OVERFLOW);
	assert_untouched(&out[0]);
	assert_untouched(&out[1]);
	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 999, NULL, out), LEDGER_OK);
}

Test(decide_transfer, insufficient_funds_before_receiver_overflow)
{
	struct ledger_account a = account("alice", "EUR", 10, 0);
	struct ledger_account b = account("bob", "EUR", INT64_MAX, 0);
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 11, NULL, out), LEDGER_INSUFFICIENT_FUNDS);
	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 10, NULL, out), LEDGER_OVERFLOW);
}

Test(decide_transfer, sender_underflow)
{
	struct ledger_account a = account("alice", "EUR", INT64_MIN + 1, INT64_MAX);
	struct ledger_account b = account("bob", "EUR", 0, 0);
	struct ledger_event out[2] = { sentinel, sentinel };

	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 2, NULL, out), LEDGER_OVERFLOW);
	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 1, NULL, out), LEDGER_INSUFFICIENT_FUNDS);
	assert_untouched(&out[0]);
	a.balance = INT64_MIN + 2;
	cr_assert_eq(ledger_decide_transfer(&a, &b, "t", 1, NULL, out), LEDGER_OK);
}

/* Evolve */

static struct ledger_account opened(const char *id, const char *currency, int64_t limit)
{
	struct ledger_account acc = { 0 };
	struct ledger_event ev = { .type = LEDGER_ACCOUNT_OPENED,
				   .account_id = id,
				   .name = "N",
				   .currency = currency,
				   .overdraft_limit = limit };

	cr_assert(ledger_evolve(&acc, &ev));
	return acc;
}

static struct ledger_event money(enum ledger_event_type type, int64_t amount)
{
	return (struct ledger_event){
		.type = type, .amount = amount, .transfer_id = "t", .counterparty = "other"
	};
}

Test(evolve, account_opened_starts_the_account)
{
	struct ledger_account acc = opened("acc-1", "JPY", 700);

	cr_assert(ledger_account_exists(&acc));
	cr_assert_str_eq(acc.id, "acc-1");
	cr_assert_str_eq(acc.currency, "JPY");
	cr_assert_eq(acc.overdraft_limit, 700);
	cr_assert_eq(acc.balance, 0);
	cr_assert_eq(acc.version, 1);
	cr_assert_not(acc.closed);
}

Test(evolve, zeroed_state_does_not_exist)
{
	struct ledger_account none = { 0 };

	cr_assert_not(ledger_account_exists(&none));
	cr_assert_not(ledger_account_exists(NULL));
}

Test(evolve, opened_takes_a_64_character_id)
{
	char id[LEDGER_ID_MAX + 1];
	struct ledger_account acc;

	memset(id, 'z', LEDGER_ID_MAX);
	id[LEDGER_ID_MAX] = '\0';
	acc = opened(id, "EUR", 0);
	cr_assert_str_eq(acc.id, id);
}

Test(evolve, each_money_event_moves_the_balance)
{
	struct ledger_account acc = opened("a", "EUR", 0);
	struct ledger_event dep = money(LEDGER_FUNDS_DEPOSITED, 1000);
	struct ledger_event wd = money(LEDGER_FUNDS_WITHDRAWN, 300);
	struct ledger_event sent = money(LEDGER_TRANSFER_SENT, 200);
	struct ledger_event recv = money(LEDGER_TRANSFER_RECEIVED, 50);

	cr_assert(ledger_evolve(&acc, &dep));
	cr_assert_eq(acc.balance, 1000);
	cr_assert_eq(acc.version, 2);
	cr_assert(ledger_evolve(&acc, &wd));
	cr_assert_eq(acc.balance, 700);
	cr_assert_eq(acc.version, 3);
	cr_assert(ledger_evolve(&acc, &sent));
	cr_assert_eq(acc.balance, 500);
	cr_assert_eq(acc.version, 4);
	cr_assert(ledger_evolve(&acc, &recv));
	cr_assert_eq(acc.balance, 550);
	cr_assert_eq(acc.version, 5);
}

Test(evolve, account_closed_marks_closed)
{
	struct ledger_account acc = opened("a", "EUR", 0);
	struct ledger_event ev = { .type = LEDGER_ACCOUNT_CLOSED_EVENT };

	cr_assert(ledger_evolve(&acc, &ev));
	cr_assert(acc.closed);
	cr_assert_eq(acc.version, 2);
	cr_assert(ledger_account_exists(&acc));
}

Test(evolve, trusts_the_log_about_business_rules)
{
	/* The deciders guarded these when they were written; a fold must replay them. */
	struct ledger_account acc = opened("a", "EUR", 0);
	struct ledger_event wd = money(LEDGER_FUNDS_WITHDRAWN, 10);

	cr_assert(ledger_evolve(&acc, &wd));
	cr_assert_eq(acc.balance, -10);
}

Test(evolve, second_opening_is_refused_unchanged)
{
	struct ledger_account acc = opened("a", "EUR", 5);
	struct ledger_account before;
	struct ledger_event again = { .type = LEDGER_ACCOUNT_OPENED,
				      .account_id = "b",
				      .name = "N",
				      .currency = "USD",
				      .overdraft_limit = 9 };

	acc.balance = 42;
	before = acc;
	cr_assert_not(ledger_evolve(&acc, &again));
	assert_same_state(&acc, &before);
}

Test(evolve, overflow_is_refused_unchanged)
{
	struct ledger_account acc = opened("a", "EUR", INT64_MAX);
	struct ledger_account before;
	struct ledger_event dep = money(LEDGER_FUNDS_DEPOSITED, 1);
	struct ledger_event recv = money(LEDGER_TRANSFER_RECEIVED, 1);
	struct ledger_event wd = money(LEDGER_FUNDS_WITHDRAWN, 1);
	struct ledger_event sent = money(LEDGER_TRANSFER_SENT, 1);

	acc.balance = INT64_MAX;
	before = acc;
	cr_assert_not(ledger_evolve(&acc, &dep));
	cr_assert_not(ledger_evolve(&acc, &recv));
	assert_same_state(&acc, &before);

	acc.balance = INT64_MIN;
	before = acc;
	cr_assert_not(ledger_evolve(&acc, &wd));
	cr_assert_not(ledger_evolve(&acc, &sent));
	assert_same_state(&acc, &before);
}

Test(evolve, reaches_the_int64_edges_exactly)
{
	struct ledger_account acc = opened("a", "EUR", INT64_MAX);
	struct ledger_event dep = money(LEDGER_FUNDS_DEPOSITED, 1);
	struct ledger_event wd = money(LEDGER_FUNDS_WITHDRAWN, 1);

	acc.balance = INT64_MAX - 1;
	cr_assert(ledger_evolve(&acc, &dep));
	cr_assert_eq(acc.balance, INT64_MAX);
	acc.balance = INT64_MIN + 1;
	cr_assert(ledger_evolve(&acc, &wd));
	cr_assert_eq(acc.balance, INT64_MIN);
}

Test(evolve, unknown_type_is_refused_unchanged)
{
	struct ledger_account acc = opened("a", "EUR", 0);
	struct ledger_account before = acc;
	struct ledger_event zero = money((enum ledger_event_type)0, 5);
	struct ledger_event big = money((enum ledger_event_type)99, 5);

	cr_assert_not(ledger_evolve(&acc, &zero));
	cr_assert_not(ledger_evolve(&acc, &big));
	cr_assert_not(ledger_evolve(&acc, NULL));
	assert_same_state(&acc, &before);
}

Test(evolve, events_before_opening_are_refused)
{
	static const enum ledger_event_type types[] = {
		LEDGER_FUNDS_DEPOSITED,   LEDGER_FUNDS_WITHDRAWN,      LEDGER_TRANSFER_SENT,
		LEDGER_TRANSFER_RECEIVED, LEDGER_ACCOUNT_CLOSED_EVENT,
	};

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		struct ledger_account none = { 0 };
		struct ledger_event ev = money(types[i], 5);

		cr_assert_not(ledger_evolve(&none, &ev), "type %d", types[i]);
		cr_assert_eq(none.version, 0);
		cr_assert_eq(none.balance, 0);
	}
}

Test(evolve, opening_that_does_not_fit_is_refused)
{
	char long_id[LEDGER_ID_MAX + 2];
	struct ledger_account acc = { 0 };
	struct ledger_event ev = {
		.type = LEDGER_ACCOUNT_OPENED, .account_id = long_id, .name = "N", .currency = "EUR"
	};

	memset(long_id, 'x', LEDGER_ID_MAX + 1);
	long_id[LEDGER_ID_MAX + 1] = '\0';
	cr_assert_not(ledger_evolve(&acc, &ev));
	ev.account_id = "";
	cr_assert_not(ledger_evolve(&acc, &ev));
	ev.account_id = NULL;
	cr_assert_not(ledger_evolve(&acc, &ev));
	ev.account_id = "a";
	ev.currency = "EURO";
	cr_assert_not(ledger_evolve(&acc, &ev));
	ev.currency = NULL;
	cr_assert_not(ledger_evolve(&acc, &ev));
	ev.currency = "EUR";
	ev.overdraft_limit = -1;
	cr_assert_not(ledger_evolve(&acc, &ev));
	cr_assert_not(ledger_account_exists(&acc));
	ev.overdraft_limit = 0;
	cr_assert(ledger_evolve(&acc, &ev));
}

Test(evolve, version_overflow_is_refused)
{
	struct ledger_account acc = opened("a", "EUR", 0);
	struct ledger_event dep = money(LEDGER_FUNDS_DEPOSITED, 1);

	acc.version = INT32_MAX;
	cr_assert_not(ledger_evolve(&acc, &dep));
	cr_assert_eq(acc.version, INT32_MAX);
	cr_assert_eq(acc.balance, 0);
}

/* Deciders and evolve together, as the command service uses them. */
Test(fold, decided_events_fold_into_the_expected_state)
{
	struct ledger_account alice = { 0 }, bob = { 0 };
	struct ledger_event ev, pair[2];

	cr_assert_eq(ledger_decide_open(&alice, "alice", "Alice", "EUR", 100, &ev), LEDGER_OK);
	cr_assert(ledger_evolve(&alice, &ev));
	cr_assert_eq(ledger_decide_open(&bob, "bob", "Bob", "EUR", 0, &ev), LEDGER_OK);
	cr_assert(ledger_evolve(&bob, &ev));
	cr_assert_eq(ledger_decide_deposit(&alice, 1, 500, "in", &ev), LEDGER_OK);
	cr_assert(ledger_evolve(&alice, &ev));
	cr_assert_eq(ledger_decide_transfer(&alice, &bob, "t-1", 550, NULL, pair), LEDGER_OK);
	cr_assert(ledger_evolve(&alice, &pair[0]));
	cr_assert(ledger_evolve(&bob, &pair[1]));
	cr_assert_eq(alice.balance, -50);
	cr_assert_eq(bob.balance, 550);
	cr_assert_eq(ledger_decide_transfer(&alice, &bob, "t-2", 51, NULL, pair),
		     LEDGER_INSUFFICIENT_FUNDS);
	cr_assert_eq(ledger_decide_withdraw(&bob, 2, 550, NULL, &ev), LEDGER_OK);
	cr_assert(ledger_evolve(&bob, &ev));
	cr_assert_eq(ledger_decide_close(&bob, 3, &ev), LEDGER_OK);
	cr_assert(ledger_evolve(&bob, &ev));
	cr_assert(bob.closed);
	cr_assert_eq(bob.version, 4);
	cr_assert_eq(alice.version, 3);
	cr_assert_eq(ledger_decide_deposit(&bob, 4, 1, NULL, &ev), LEDGER_ACCOUNT_CLOSED);
}
