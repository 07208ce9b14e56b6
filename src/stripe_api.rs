//! Calls to the Stripe API, through async-stripe.
//!
//! Only what the service needs: creating a Checkout Session in payment mode.
//! Every call carries an idempotency key so that Stripe, too, refuses to make
//! a second session for a retried request.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_checkout::{
    CheckoutSessionMode,
    checkout_session::{
        CreateCheckoutSession, CreateCheckoutSessionLineItems,
        CreateCheckoutSessionPaymentIntentData,
    },
};

use crate::config::StripeConfig;

#[derive(Clone)]
pub struct StripeApi {
    client: stripe::Client,
}

/// What the service asks Stripe for, already validated.
#[derive(Clone, Debug)]
pub struct NewCheckoutSession {
    pub line_items: Vec<LineItem>,
    pub success_url: String,
    pub cancel_url: String,
    pub client_reference_id: Option<String>,
    pub metadata: HashMap<String, String>,
}

/// The metadata key under which the service tags what it creates at Stripe.
/// Events carrying it are about our objects, even before we recorded them;
/// events without it are about objects made elsewhere on the account.
pub const REFERENCE_KEY: &str = "payments_ref";

#[derive(Clone, Debug)]
pub struct LineItem {
    pub price: String,
    pub quantity: u64,
}

/// The parts of Stripe's answer the service keeps.
#[derive(Clone, Debug)]
pub struct CreatedSession {
    pub id: String,
    pub url: Option<String>,
    pub status: String,
    pub payment_status: String,
    pub expires_at: DateTime<Utc>,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    pub livemode: bool,
    pub client_reference_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StripeCallError {
    /// Stripe answered and refused; `code` and `param` are safe to show the
    /// caller, Stripe's message is not (it can quote account details).
    #[error("stripe refused the request with status {status}")]
    Refused {
        status: u16,
        code: Option<String>,
        param: Option<String>,
    },
    /// Stripe could not be reached or did not answer in time.
    #[error("stripe unreachable: {0}")]
    Unreachable(String),
}

impl StripeApi {
    pub fn new(config: &StripeConfig) -> anyhow::Result<Self> {
        let client = stripe::ClientBuilder::new(config.secret_key.expose())
            .url(config.api_base.clone())
            .timeout(config.request_timeout)
            .app_info("payments", Some(env!("CARGO_PKG_VERSION").to_owned()), None)
            .build()
            .context("build the Stripe client")?;
        Ok(Self { client })
    }

    /// `reference` tags the session and its PaymentIntent (see [`REFERENCE_KEY`]).
    pub async fn create_checkout_session(
        &self,
        request: &NewCheckoutSession,
        idempotency_key: &str,
        reference: &str,
    ) -> Result<CreatedSession, StripeCallError> {
        let key = IdempotencyKey::new(idempotency_key)
            .map_err(|e| StripeCallError::Unreachable(format!("idempotency key: {e}")))?;
        let session = build_create(request, reference)
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await
            .map_err(classify)?;
        Ok(CreatedSession {
            id: session.id.to_string(),
            url: session.url,
            status: session.status.map(|s| s.to_string()).unwrap_or_default(),
            payment_status: session.payment_status.to_string(),
            expires_at: DateTime::from_timestamp(session.expires_at, 0).unwrap_or_default(),
            amount_total: session.amount_total,
            currency: session.currency.map(|c| c.to_string()),
            livemode: session.livemode,
            client_reference_id: session.client_reference_id,
        })
    }
}

fn build_create(request: &NewCheckoutSession, reference: &str) -> CreateCheckoutSession {
    let line_items: Vec<_> = request
        .line_items
        .iter()
        .map(|item| {
            let mut line = CreateCheckoutSessionLineItems::new();
            line.price = Some(item.price.clone());
            line.quantity = Some(item.quantity);
            line
        })
        .collect();
    let mut metadata = request.metadata.clone();
    metadata.insert(REFERENCE_KEY.to_owned(), reference.to_owned());
    let mut payment_intent = CreateCheckoutSessionPaymentIntentData::new();
    payment_intent.metadata = Some(HashMap::from([(
        REFERENCE_KEY.to_owned(),
        reference.to_owned(),
    )]));
    let mut create = CreateCheckoutSession::new()
        .mode(CheckoutSessionMode::Payment)
        .line_items(line_items)
        .success_url(request.success_url.clone())
        .cancel_url(request.cancel_url.clone())
        .metadata(metadata)
        .payment_intent_data(payment_intent);
    if let Some(client_reference) = &request.client_reference_id {
        create = create.client_reference_id(client_reference.clone());
    }
    create
}

fn classify(err: StripeError) -> StripeCallError {
    match err {
        StripeError::Stripe(api, status) => StripeCallError::Refused {
            status,
            code: api.code.map(|c| c.to_string()),
            param: api.param,
        },
        other => StripeCallError::Unreachable(other.to_string()),
    }
}
